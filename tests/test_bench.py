"""bench.py's smoke run at the tiny shape: every method, the peer, the evaluation rows, the table and
bench.json. No timing is asserted (performance is measured, not tested)."""

import json

import bench


def test_bench_tiny_writes_every_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--shape", "tiny", "--method", "lora", "echo-dora", "dora", "--batch-size", "4", "--steps", "1",
                "--warmup", "1", "--questions", "2", "--max-new-tokens", "4", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = {(r["impl"], r["method"]): r for r in result["train"]}
    assert set(rows) == {("ours", "lora"), ("peft", "lora"), ("ours", "echo-dora"), ("ours", "dora"), ("peft", "dora")}
    assert all(r["tokens_per_s"] > 0 and 0 < r["of_ceiling"] and 0 < r["of_real_shape_limit"] for r in rows.values())
    assert "vs_peft" in rows[("ours", "lora")] and "step_vs_base" in rows[("ours", "echo-dora")]
    evaluation = result["evaluation"]
    assert evaluation["questions"] == 2 and evaluation["ours"]["questions_per_s"] > 0
    assert evaluation["transformers"]["questions_per_s"] > 0
    assert "| ours | lora |" in capsys.readouterr().out and out.with_suffix(".md").is_file()


def test_bench_cloze_form_scores_as_transformers_does(tmp_path, capsys):
    """With --cloze the evaluation rows are eval.py --scoring cloze (the shared prompt computed once)
    and transformers' forward over each whole prompt + choice: every answer must agree."""
    out = tmp_path / "bench.json"
    bench.main(["--shape", "tiny", "--cloze", "--method", "lora", "--batch-size", "4", "--steps", "1", "--warmup", "1",
                "--questions", "6", "--profile", "--out", str(out)])
    result = json.loads(out.read_text())
    evaluation = result["evaluation"]
    assert evaluation["scoring"] == "cloze" and evaluation["questions"] == 6 and evaluation["same_answers"] == 6
    printed = capsys.readouterr().out
    assert "cloze evaluation, 6 real test prompts: transformers" in printed
    assert "profile, ours lora: " in printed and len(result["train"][0]["profile_s"]) == 8
