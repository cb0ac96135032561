"""The route of SmolLM2's 94 MiB GGUF file to a machine that takes 64 MiB per transfer
(data/prepare_smollm2.py --split-to / --from-parts): parts that fit, joined back to the same
sha256, converted to the same HF folder as the file itself."""

import json

import pytest
from safetensors.torch import load_file

from data.prepare_smollm2 import PART_MIB, installed_gguf, join_parts, main, sha256_of, split_file


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return split_file(installed_gguf(), tmp_path_factory.mktemp("parts"))


def test_parts_fit_a_transfer_and_join_to_the_same_sha256(parts):
    original = installed_gguf()
    manifest = json.loads(parts.read_text())
    sizes = [(parts.parent / p["name"]).stat().st_size for p in manifest["parts"]]
    assert len(sizes) == 2 and max(sizes) <= PART_MIB << 20 and sum(sizes) == original.stat().st_size
    joined = join_parts(parts)
    assert joined != original and sha256_of(joined) == sha256_of(original) == manifest["sha256"]


def test_joined_parts_convert_to_the_same_folder_as_the_file(parts, smollm2_ckpt, tmp_path):
    out = tmp_path / "smollm2-135m"
    main(["--from-parts", str(parts), "--out", str(out)])
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in smollm2_ckpt.iterdir())
    ours, reference = load_file(str(out / "model.safetensors")), load_file(str(smollm2_ckpt / "model.safetensors"))
    assert ours.keys() == reference.keys() and all(ours[k].equal(reference[k]) for k in ours)
    for file in out.iterdir():
        if file.name != "model.safetensors":
            assert file.read_bytes() == (smollm2_ckpt / file.name).read_bytes(), file.name


def test_a_damaged_or_missing_part_is_named(tmp_path):
    source = tmp_path / "file.bin"
    source.write_bytes(bytes(range(256)) * 10)
    manifest = split_file(source, tmp_path / "parts", part_bytes=1000)
    assert len(json.loads(manifest.read_text())["parts"]) == 3
    damaged = tmp_path / "parts" / "file.bin.part01"
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])
    with pytest.raises(ValueError, match=r"file.bin.part01: sha256 differs"):
        join_parts(manifest)
    damaged.unlink()
    with pytest.raises(FileNotFoundError, match=r"part file.bin.part01 is missing"):
        join_parts(manifest)
    with pytest.raises(SystemExit, match="prepare_smollm2.py: .*part file.bin.part01 is missing"):
        main(["--from-parts", str(manifest), "--out", str(tmp_path / "out")])
