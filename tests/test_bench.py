"""bench.py's CPU smoke run: every workload, both implementations, the table and bench.json.
No timing is asserted (performance is measured, not tested)."""

import json

import pytest

import bench
from conftest import ASSETS


def test_bench_tiny_runs_all_workloads_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--shape", "tiny", "--method", "lora", "echo-dora", "--batch-size", "4", "--seq-len", "32",
                "--steps", "1", "--warmup", "1", "--out", str(out),
                "--data", str(ASSETS / "data" / "commonsense" / "openbookqa" / "test.json"),
                "--tokenizer", str(ASSETS / "models" / "llama2-tokenizer" / "tokenizer.model"),
                "--test-sets", str(ASSETS / "data" / "commonsense"), "--questions-per-set", "2"])
    result = json.loads(out.read_text())
    rows = {(r["workload"], r["impl"], r["method"], r["echo_pass"]): r for r in result["train"]}
    assert set(rows) == {(w, i, m, p) for w in ("fixed 16x256", "real records")
                         for i, m, p in (("ours", "lora", "-"), ("peft", "lora", "-"), ("ours", "echo-dora", "suffix"),
                                         ("ours", "echo-dora", "full"))}
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    assert "vs_peft" in rows[("real records", "ours", "lora", "-")]
    assert set(result["decode"]) == {"ours", "transformers"} and result["lora_ceiling_tokens_per_s"] > 0
    assert result["evaluation"]["beams_4"]["questions"] == 14  # 2 from each of the 7 sets here
    assert "| real records | ours | lora |" in capsys.readouterr().out


def test_device_suite_runs_end_to_end_at_the_tiny_shape(tmp_path, capsys):
    """The device suite (for a CUDA machine), on the CPU: parity passes (fp32 and bf16), torchrun
    trains, and the speed suite writes its rows; every part's file is there."""
    out = tmp_path / "results"
    bench.main(["--suite", "device", "--shape", "tiny", "--method", "dora", "--batch-size", "4", "--seq-len", "32",
                "--steps", "1", "--warmup", "1", "--questions-per-set", "1", "--out", str(out)])
    parity = json.loads((out / "parity.json").read_text())
    assert len(parity["checks"]) == 10 and all(c["ok"] for c in parity["checks"])
    assert {c["precision"] for c in parity["checks"]} == {"fp32", "bf16"}
    smoke = json.loads((out / "torchrun.json").read_text())
    assert smoke["returncode"] == 0 and smoke["backend"] == "gloo" and smoke["metrics"][-1]["step"] == 3
    result = json.loads((out / "bench.json").read_text())
    assert {(r["workload"], r["impl"]) for r in result["train"]} == {
        (w, i) for w in ("fixed 16x256", "real records") for i in ("ours", "peft")}
    assert all(0 < r["of_ceiling"] for r in result["train"])
    assert result["evaluation"]["beams_1"]["questions"] == 7
    assert (out / "bench.md").read_text().startswith("device: cpu")


def test_device_suite_stops_on_a_parity_mismatch(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.PARITY_TOLERANCE, "bf16", 1e-9)  # no bf16 run is that close: a mismatch
    with pytest.raises(SystemExit, match="parity failed: bf16 logits differs"):
        bench.main(["--suite", "device", "--shape", "tiny", "--out", str(tmp_path / "results")])
    assert not json.loads((tmp_path / "results" / "parity.json").read_text())["checks"][0]["ok"]
    assert not (tmp_path / "results" / "torchrun.json").exists()
