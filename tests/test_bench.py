"""bench.py's CPU smoke run: every workload, both implementations, the table and bench.json.
No timing is asserted (performance is measured, not tested)."""

import json

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
