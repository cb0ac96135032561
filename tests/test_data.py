"""data/: the upstream prompt bytes, answer-only labels on real records, file checks, download."""

import hashlib
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ASSETS, ROOT
from data import download, make_sample
from data.commonsense import (
    IGNORE_INDEX,
    answer_start,
    encode_record,
    eval_prompt,
    load_records,
    train_prompt,
    train_prompt_without_output,
)
from data.tokenizer import Tokenizer

COMMONSENSE = ASSETS / "data" / "commonsense"
RECORD = {"instruction": "Is it so?", "input": "", "output": "the correct answer is true", "answer": "true"}
WITH_INPUT = {**RECORD, "input": "Some context."}


def visible(text: str) -> str:
    """Expected prompts below spell every indentation and trailing space as '·'."""
    return text.replace("·", " ")


# Read off LLM-Adapters finetune.py / commonsense_evaluate.py (same bytes in NVlabs/DoRA).
TRAIN_NO_INPUT = visible(
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.··\n"
    "\n"
    "················### Instruction:\n"
    "················Is it so?\n"
    "················\n"
    "················### Response:\n"
    "················the correct answer is true"
)
TRAIN_WITH_INPUT = visible(
    "Below is an instruction that describes a task, paired with an input that provides further context."
    " Write a response that appropriately completes the request.·\n"
    "\n"
    "················### Instruction:\n"
    "················Is it so?\n"
    "················\n"
    "················### Input:\n"
    "················Some context.\n"
    "················\n"
    "················### Response:\n"
    "················the correct answer is true"
)
EVAL_NO_INPUT = visible(
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.·\n"
    "\n"
    "················### Instruction:\n"
    "················Is it so?\n"
    "\n"
    "················### Response:\n"
    "················"
)
EVAL_WITH_INPUT = visible(
    "Below is an instruction that describes a task, paired with an input that provides further context."
    " Write a response that appropriately completes the request.\n"
    "\n"
    "················### Instruction:\n"
    "················Is it so?\n"
    "\n"
    "················### Input:\n"
    "················Some context.\n"
    "\n"
    "················### Response:\n"
    "················"
)


@pytest.fixture(scope="module")
def llama2_tokenizer():
    return Tokenizer(ASSETS / "models" / "llama2-tokenizer" / "tokenizer.model")


def test_train_prompt_is_upstream_bytes():
    assert train_prompt(RECORD) == TRAIN_NO_INPUT
    assert train_prompt(WITH_INPUT) == TRAIN_WITH_INPUT
    assert train_prompt_without_output(RECORD) == TRAIN_NO_INPUT.removesuffix("the correct answer is true")


def test_eval_prompt_is_upstream_bytes():
    assert eval_prompt(RECORD) == EVAL_NO_INPUT
    assert eval_prompt(WITH_INPUT) == EVAL_WITH_INPUT


@pytest.mark.parametrize("record, differing_lines", [(RECORD, [0, 4]), (WITH_INPUT, [0, 4, 7])])
def test_train_and_eval_prompts_differ_only_in_upstream_whitespace(record, differing_lines):
    train, evaluation = train_prompt_without_output(record).split("\n"), eval_prompt(record).split("\n")
    assert len(train) == len(evaluation)
    differing = [i for i, (t, e) in enumerate(zip(train, evaluation)) if t != e]
    assert differing == differing_lines  # the header's trailing spaces and the 16-space separators
    assert all(t.rstrip() == e.rstrip() for t, e in zip(train, evaluation))


@pytest.mark.parametrize("name", ["ARC-Easy", "boolq"])
def test_only_output_and_eos_are_labelled_on_real_records(llama2_tokenizer, name):
    tok = llama2_tokenizer
    for record in load_records(COMMONSENSE / name / "train.json")[:200]:
        ids, labels = encode_record(tok, record)
        start = answer_start(labels)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) < 256
        assert labels[:start] == [IGNORE_INDEX] * start and labels[start:] == ids[start:]
        # The prompt-length mask lands exactly on the output: " the correct answer is ..." + EOS.
        assert labels[start:] == tok.encode(record["output"]) + [tok.eos_id]
        assert tok.decode(labels[start:-1]) == record["output"]


def test_llama3_tokenizer_labels_the_output_too():
    tok = Tokenizer(ASSETS / "models" / "llama3-tokenizer" / "tokenizer.model")
    for record in load_records(COMMONSENSE / "ARC-Easy" / "train.json")[:50]:
        ids, labels = encode_record(tok, record)
        start = answer_start(labels)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert labels[start:] == tok.encode(" " + record["output"]) + [tok.eos_id]


def test_cutoff_truncates_drops_eos_and_can_cut_the_answer(llama2_tokenizer):
    tok = llama2_tokenizer
    record = load_records(COMMONSENSE / "boolq" / "train.json")[0]
    ids, labels = encode_record(tok, record)
    n_text, start = len(ids) - 1, answer_start(labels)  # tokens before the EOS; first answer token

    ids_exact, _ = encode_record(tok, record, cutoff=n_text)  # the text fills the cutoff: no room for EOS
    assert ids_exact == ids[:-1]
    assert encode_record(tok, record, cutoff=n_text + 1) == (ids, labels)

    ids_cut, labels_cut = encode_record(tok, record, cutoff=start + 2)
    assert ids_cut == ids[:start + 2] and tok.eos_id not in ids_cut
    assert answer_start(labels_cut) == start and labels_cut[start:] == ids[start:start + 2]

    ids_none, labels_none = encode_record(tok, record, cutoff=start)
    assert len(ids_none) == start and answer_start(labels_none) is None
    assert set(labels_none) == {IGNORE_INDEX}


@pytest.mark.parametrize("name, records", [("boolq", 200), ("piqa", 320), ("social_i_qa", 200), ("winogrande", 200),
                                           ("ARC-Easy", 200), ("ARC-Challenge", 200), ("openbookqa", 500)])
def test_real_test_sets_load(name, records):
    assert len(load_records(COMMONSENSE / name / "test.json")) == records  # the slices of SOURCES.md


@pytest.mark.parametrize("content, message", [
    ('[\n{"instruction": ', "not valid JSON: Expecting value at line 2 column 17"),
    ('{"instruction": "q"}', "expected a JSON array of records, found dict"),
    ('[{"instruction": "q", "input": "", "output": "o", "answer": "a"}, "q"]', "record 1: expected an object"),
    ('[{"instruction": "q", "input": "", "output": "o", "answer": "a"}, {"instruction": "q", "input": "", '
     '"output": "o"}]', "record 1: missing key 'answer'"),
    ('[{"instruction": "q", "input": null, "output": "o", "answer": "a"}]',
     "record 0: key 'input' must be a string, found NoneType"),
])
def test_load_records_errors_name_the_file_and_record(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError) as e:
        load_records(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_load_records_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.json: no such file"):
        load_records(tmp_path / "nothing.json")


def make_mirror(root):
    """A folder laid out like the LLM-Adapters repo, holding openbookqa's real test set: the one test
    set committed whole (tests/assets), so its pinned hashes can be checked."""
    (root / "dataset" / "openbookqa").mkdir(parents=True)
    shutil.copyfile(COMMONSENSE / "openbookqa" / "test.json", root / "dataset" / "openbookqa" / "test.json")
    return root.as_uri()


def test_download_fetches_verifies_and_skips_present_files(tmp_path, capsys):
    url, dest = make_mirror(tmp_path / "mirror"), tmp_path / "data"
    (dest / "openbookqa").mkdir(parents=True)
    (dest / "openbookqa" / "test.json").write_text("[]")  # a stale file is replaced, not trusted
    download.main(["--dest", str(dest), "--only", "openbookqa", "--base-url", url])
    assert (dest / "openbookqa" / "test.json").read_bytes() == (COMMONSENSE / "openbookqa" / "test.json").read_bytes()
    download.main(["--dest", str(dest), "--only", "openbookqa", "--base-url", url])
    assert "openbookqa: already present" in capsys.readouterr().out
    assert sorted(p.name for p in dest.rglob("*")) == ["openbookqa", "test.json"]


def test_download_of_a_changed_file_fails_and_writes_nothing(tmp_path):
    url, dest = make_mirror(tmp_path / "mirror"), tmp_path / "data"
    mirrored = tmp_path / "mirror" / "dataset" / "openbookqa" / "test.json"
    mirrored.write_text(mirrored.read_text().replace('"answer": "answer1"', '"answer": "answer2"', 1))  # still valid
    run = subprocess.run([sys.executable, str(ROOT / "data" / "download.py"), "--dest", str(dest),
                          "--only", "openbookqa", "--base-url", url], capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.startswith(f"download.py: {url}/dataset/openbookqa/test.json: not the pinned LLM-Adapters file")
    assert "git blob id" in run.stderr and run.stderr.count("\n") == 1
    assert list(dest.rglob("*")) in ([], [dest / "openbookqa"])  # no file, no leftover temporary


def test_git_blob_id_matches_git():
    # The example in Pro Git, "Git Internals - Git Objects": echo 'test content' | git hash-object --stdin
    assert download.git_blob_id(b"test content\n") == "d670460b4b4aece5915caf5c68d12f560a9fe3e4"


def test_sample_files_are_reproducible_and_disjoint(tmp_path, monkeypatch):
    monkeypatch.setattr(make_sample, "OUT", tmp_path)
    make_sample.main()
    sample = ROOT / "data" / "sample"
    files = ["train.json", "boolq/test.json", "ARC-Easy/test.json"]
    assert all((tmp_path / f).read_bytes() == (sample / f).read_bytes() for f in files)
    train, boolq, arc = (load_records(sample / f) for f in files)
    assert len(train) == 600 and len(boolq) == len(arc) == 40
    for records, labels in [(boolq, {"true", "false"}), (arc, {"answer1", "answer2", "answer3", "answer4"}),
                            (train, {"true", "false", "answer1", "answer2", "answer3", "answer4"})]:
        assert {r["answer"] for r in records} == labels
        assert all(r["output"] == "the correct answer is " + r["answer"] and r["input"] == "" for r in records)
    train_instructions = {r["instruction"] for r in train}
    assert not train_instructions & {r["instruction"] for r in boolq + arc}
    assert len(train_instructions) == len(train)


def test_assets_match_their_sources():
    """Every committed real file is the one tests/assets/SOURCES.md names (size and sha256), and
    nothing sits there unlisted."""
    rows = re.findall(r"^\| `([^`]+)` \| (\d+) \| ([0-9a-f]{64}) \|$", (ASSETS / "SOURCES.md").read_text(), re.M)
    listed = {name: (int(size), digest) for name, size, digest in rows}
    present = {p.relative_to(ASSETS).as_posix() for p in ASSETS.rglob("*") if p.is_file()} - {"SOURCES.md"}
    assert present == set(listed)
    for name, (size, digest) in listed.items():
        content = (ASSETS / name).read_bytes()
        assert (len(content), hashlib.sha256(content).hexdigest()) == (size, digest), name


def test_every_real_record_has_a_cloze_form():
    """The cloze departure reads each record's question and choices off its instruction: on every
    real record here (seven benchmarks' test slices, four training splits) the choices are as many
    as the answer format's labels, none empty, the gold label among them."""
    from data.commonsense import cloze_choices

    files = sorted((ASSETS / "data" / "commonsense").glob("*/*.json"))
    assert len(files) == 11
    for path in files:
        for record in load_records(path):
            question, choices, labels = cloze_choices(record)
            assert question and all(choices) and len(choices) == len(labels) and record["answer"] in labels, path


def test_cloze_record_trains_on_the_correct_choice_text():
    from data.commonsense import encode_cloze_record
    from data.tokenizer import Tokenizer

    tokenizer = Tokenizer(ASSETS / "models" / "llama2-tokenizer" / "tokenizer.model")
    record = load_records(ASSETS / "data" / "commonsense" / "ARC-Easy" / "train.json")[0]
    ids, labels = encode_cloze_record(tokenizer, record)
    trained = [t for t in labels if t != -100]
    assert trained[-1] == tokenizer.eos_id and tokenizer.decode(trained[:-1]).strip() in record["instruction"]
    assert tokenizer.decode(ids[:len(ids) - len(trained)]).startswith("Question: ")
