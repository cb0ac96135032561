"""Fetch the public commonsense data: commonsense_170k.json, the eight test sets, four training splits.

    python data/download.py                      # everything, into data/
    python data/download.py --only ARC-Easy-train ARC-Easy   # one benchmark's training split and test set
    python data/download.py --base-url URL       # a mirror laid out like the upstream repo

LLM-Adapters' files (ODC-By) at a pinned commit, checked against their git blob ids (and sha256
where known) before anything is written, then written atomically.
"""

import argparse
import hashlib
import sys
import urllib.request
from pathlib import Path
from typing import NamedTuple

if not __package__:  # run as a script (python data/download.py): make the `data` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.commonsense import parse_records
from data.files import write_atomically

COMMIT = "816657208af4db747803f87ba40a4c71383fed7a"  # LLM-Adapters HEAD, 2024-03-10
BASE_URL = f"https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/{COMMIT}/"


class Source(NamedTuple):
    upstream: str  # path inside the LLM-Adapters repo
    local: str  # path under --dest
    git_blob: str  # `git hash-object` of the file, from the upstream tree
    sha256: str | None  # None where the file was too large to copy and hash here


def _test_set(name: str, git_blob: str, sha256: str | None) -> Source:
    return Source(f"dataset/{name}/test.json", f"{name}/test.json", git_blob, sha256)


def _train_split(name: str, git_blob: str, sha256: str) -> Source:
    return Source(f"dataset/{name}/train.json", f"{name}/train.json", git_blob, sha256)


# Hashes of the upstream files (see data/README.md).
SOURCES = {
    "boolq": _test_set("boolq", "6d7edb0a8e8a6566b546ccf0d98d24e48db3fdf3",
                       "89df2397cbca81dc31adcc6f7f5b635821aa0565aafde46725b2b4bd39b4dfa9"),
    "piqa": _test_set("piqa", "f7a1c260692ef31796d4763cb6334f316a754fed",
                      "3860d11b9b42e590b6b4bbc1643214d373ed0b0d4ac62fcc7bdceb8e044ad141"),
    "social_i_qa": _test_set("social_i_qa", "eadf221799ca394367b144c0f86ee0436db409d2",
                             "71543f41127451945379d106ffedaef502f1c8770dff6d2f543aca85e3080b1d"),
    "hellaswag": _test_set("hellaswag", "183c4920415f83ba4b793c4873a33e7e10bd1be5", None),
    "winogrande": _test_set("winogrande", "21257263593dd4d00546e1918c88ca0f357b08ad",
                            "6946f5209e7114c65c6d04f8f644c5a061af20d730b1cfe158fff3dc44076fb9"),
    "ARC-Easy": _test_set("ARC-Easy", "6c0d30aaedaeca148df6bcd7aaacf7c31e6ad70f",
                          "3f32a84716ca6d57d38728bf80cc8117aecd17445c2cf29a68b571b810eb82dc"),
    "ARC-Challenge": _test_set("ARC-Challenge", "9540685439144200b5a7e48dab9ca4655be2af09",
                               "4a89ce368ae01a71d268d9851686738b2a0a1d84271116bab49a1dd2b48ecad7"),
    "openbookqa": _test_set("openbookqa", "a6e69676104bcb77237388c3b5a3f0dcbb81d1e2",
                            "8479930f7b8a26052c78250280b5465a4016ca7fc806af440d0f37e243f3099e"),
    "commonsense_170k": Source("ft-training_set/commonsense_170k.json", "commonsense_170k.json",
                               "529e426b33d4cdb1d0c4a275a1a7245ad081fd91", None),
    # Four benchmarks' training splits, also committed upstream: real training data of a size a small
    # model can be fine-tuned on in minutes (results/smollm2-cpu/NOTES.md).
    "ARC-Easy-train": _train_split("ARC-Easy", "488a8e5e5bbbd7a630ebbfe07a1fd91b7d9d8c9b",
                                   "6a06cece3dec32f4fb1c1b0fc29dab14be7cf3053b417290dbc6cd845359f5ff"),
    "ARC-Challenge-train": _train_split("ARC-Challenge", "d7e080b04bff9fd16dd85455fb04481807a088d8",
                                        "a9debff28aafed86a08211dc3584a3b6cb38edca8c56bb34cd5002ed54aeebfb"),
    "boolq-train": _train_split("boolq", "87a7beee26b49f81c450641ef2ff84f55611321f",
                                "5ccbaceebaddc69765e1c4a363632196b81851d303696672165ab59ec4e48c83"),
    "openbookqa-train": _train_split("openbookqa", "75bcd5eb9f5e77a3796c05e6bb38f169d19563fc",
                                     "a1e094eeea01f70c0baa880f37497b26700ae99b243927b9c529984de9b1fe90"),
}


def git_blob_id(data: bytes) -> str:
    """What `git hash-object` prints: SHA-1 over a "blob <size>\\0" header and the bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hash_mismatch(source: Source, data: bytes) -> str | None:
    """Describe how `data` differs from the pinned file, or None when it is that file."""
    found = git_blob_id(data)
    if found != source.git_blob:
        return f"git blob id {found} ({len(data)} bytes), expected {source.git_blob}"
    if source.sha256 is not None and hashlib.sha256(data).hexdigest() != source.sha256:
        return f"sha256 {hashlib.sha256(data).hexdigest()}, expected {source.sha256}"
    return None


def fetch(name: str, base_url: str, dest: Path):
    """Download one file, verify its hashes and format, then write it under `dest`."""
    source = SOURCES[name]
    path = dest / source.local
    if path.is_file() and hash_mismatch(source, path.read_bytes()) is None:
        print(f"{name}: already present at {path}")
        return
    url = base_url.rstrip("/") + "/" + source.upstream
    print(f"{name}: fetching {url}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as e:  # URLError, HTTPError and timeouts; URLError keeps its cause in .reason
        raise OSError(f"{url}: cannot download: {getattr(e, 'reason', e)}") from None
    problem = hash_mismatch(source, data)
    if problem:
        raise ValueError(f"{url}: not the pinned LLM-Adapters file ({problem}); {path} not written")
    records = parse_records(data.decode("utf-8"), url)
    write_atomically(path, lambda tmp: tmp.write_bytes(data))
    print(f"{name}: {len(records)} records -> {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--dest", type=Path, default=Path(__file__).resolve().parent,
                        help="folder to write into (default: this data/ folder)")
    parser.add_argument("--only", nargs="+", choices=list(SOURCES), default=list(SOURCES), metavar="NAME",
                        help=f"fetch only these: {' '.join(SOURCES)}")
    parser.add_argument("--base-url", default=BASE_URL,
                        help="base URL of a tree laid out like the upstream repo (default: %(default)s)")
    args = parser.parse_args(argv)
    for name in args.only:
        fetch(name, args.base_url, args.dest)


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:  # one line naming the file, not a traceback
        sys.exit(f"download.py: {e}")
