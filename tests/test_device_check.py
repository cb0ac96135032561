"""scripts/device_check.py, the first command on a new (GPU) machine, at the tiny shape on a CPU:
parity passes in fp32 and bf16, torchrun trains, each part's file is written; a parity mismatch
stops before torchrun."""

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import device_check  # noqa: E402


def test_device_check_runs_end_to_end_at_the_tiny_shape(tmp_path):
    out = tmp_path / "results"
    device_check.main(["--shape", "tiny", "--out", str(out)])
    parity = json.loads((out / "parity.json").read_text())
    assert len(parity["checks"]) == 10 and all(c["ok"] for c in parity["checks"])
    assert {c["precision"] for c in parity["checks"]} == {"fp32", "bf16"}
    assert {c["what"] for c in parity["checks"]} == {"logits", "lora logits", "lora adapter gradients",
                                                    "dora logits", "dora adapter gradients"}
    smoke = json.loads((out / "torchrun.json").read_text())
    assert smoke["returncode"] == 0 and smoke["backend"] == "gloo" and smoke["metrics"][-1]["step"] == 3


def test_device_check_stops_on_a_parity_mismatch(tmp_path, monkeypatch):
    monkeypatch.setitem(device_check.PARITY_TOLERANCE, "bf16", 1e-9)  # no bf16 run is that close: a mismatch
    with pytest.raises(SystemExit, match="parity failed: bf16 logits differs"):
        device_check.main(["--shape", "tiny", "--out", str(tmp_path / "results")])
    checks = json.loads((tmp_path / "results" / "parity.json").read_text())["checks"]
    assert not next(c for c in checks if (c["precision"], c["what"]) == ("bf16", "logits"))["ok"]
    assert not (tmp_path / "results" / "torchrun.json").exists()


def test_flags_state_their_defaults_and_no_abbreviations(capsys):
    with pytest.raises(SystemExit):
        device_check.main(["--sha", "tiny"])
    assert "unrecognized arguments: --sha" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        device_check.main(["--help"])
    assert " ".join(capsys.readouterr().out.split()).count("(default: ") == 2  # --shape, --out
