"""bench.py --suite experiment end to end on CPU at a toy scale: every method, two seeds, the real
training splits and test sets (tests/assets slices), a tiny random LLaMA with the real LLaMA-2
tokenizer. Run times are simulated (a fake clock advanced by fixed seconds per train.py and eval.py
call), so the budget's decisions are exact: which runs start, which are skipped, and that a rerun
continues where the last call stopped, also after a crash mid-run. The table is checked against
accuracies and flips recomputed here from the runs' predictions.jsonl."""

import json
import shutil
import statistics

import pytest
import torch

import bench
import eval as evaluator
import llama
import train
from conftest import ASSETS
from reference import write_meta_folder
from tokenizer import Tokenizer

DATA = ASSETS / "data" / "commonsense"  # the four training splits and their test sets, real records
TOKENIZER = ASSETS / "models" / "llama2-tokenizer" / "tokenizer.model"
TRAIN_SECONDS = {"lora": 10, "echo-lora": 12, "dora": 14, "echo-dora": 16}  # simulated
EVAL_SECONDS = 5
TOY = ["--train-flags=--max-steps 3 --batch-size 4 --micro-batch-size 4 --val-size 4 --warmup-steps 1 "
       "--eval-every 3 --save-every 2 --cutoff 160 --lr 1e-2 --device cpu", "--eval-flags=--limit 3 --device cpu"]
SETS = ["boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"]  # the table's column order


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """dim 64, 2 blocks, weights of std 0.2 (replies depend on the question), and an output head
    that can only write the pieces of the labels ("answer", digits, "true", "false"): greedy
    replies name labels, some right, and a few training steps flip some of them, so the table's
    numbers differ between runs."""
    tokenizer = Tokenizer(TOKENIZER)
    pieces = sorted(set(tokenizer.encode("answer1 answer2 answer3 answer4 answer5 true false", bos=False, eos=False)))
    torch.manual_seed(0)
    model = llama.Transformer(llama.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000,
                                              multiple_of=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.2)
        rows = model.output.weight[pieces].clone()
        model.output.weight.zero_()
        model.output.weight[pieces] = rows
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-labels"
    write_meta_folder(model, folder)
    shutil.copy(TOKENIZER, folder)
    return folder


@pytest.fixture
def simulated_time(monkeypatch):
    """bench.clock advances only by the simulated seconds of each train.py and eval.py call."""
    now = [0.0]
    real_train, real_eval = train.main, evaluator.main

    def train_main(argv):
        real_train(argv)
        now[0] += TRAIN_SECONDS[argv[argv.index("--method") + 1]]

    def eval_main(argv):
        code = real_eval(argv)
        now[0] += EVAL_SECONDS
        return code

    monkeypatch.setattr(bench, "clock", lambda: now[0])
    monkeypatch.setattr(train, "main", train_main)
    monkeypatch.setattr(evaluator, "main", eval_main)


def experiment(ckpt, out, budget_minutes, *extra):
    bench.main(["--suite", "experiment", "--ckpt", str(ckpt), "--data-dir", str(DATA), "--out", str(out),
                "--seeds", "1", "2", "--budget-minutes", str(budget_minutes), *TOY, *extra])
    return json.loads((out / "experiment.json").read_text())


def status(manifest) -> dict[str, str]:
    return {name: run["status"] for name, run in manifest["runs"].items()}


def read_predictions(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def accuracy(folder, dataset) -> float:
    predictions = [p for p in read_predictions(folder) if p["dataset"] == dataset]
    return 100 * sum(p["correct"] for p in predictions) / len(predictions)


def expected_row(out, method, folders) -> str:
    """The table row of `method`, recomputed from its runs' predictions.jsonl."""
    def cell(values):
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0:.1f}"

    per_set = [[accuracy(out / f, d) for f in folders] for d in SETS]
    averages = [statistics.mean(accuracy(out / f, d) for d in SETS) for f in folders]
    return "| " + " | ".join([method, str(len(folders))] + [cell(v) for v in per_set] + [cell(averages)]) + " |"


def flips(out, echo, base, seeds) -> tuple[int, int]:
    gained = lost = 0
    for seed in seeds:
        e, b = (read_predictions(out / f"{m}-s{seed}") for m in (echo, base))
        for pe, pb in zip(e, b):
            assert (pe["dataset"], pe["index"]) == (pb["dataset"], pb["index"])
            gained += pe["correct"] and not pb["correct"]
            lost += pb["correct"] and not pe["correct"]
    return gained, lost


def test_experiment_sizes_runs_to_the_budget_continues_and_tabulates(ckpt, tmp_path, simulated_time, monkeypatch):
    out = tmp_path / "experiment"

    # Call 1, one minute: the untouched model (5 s) and the first pair start with nothing timed;
    # lora-s1 takes 15 s, so echo-lora-s1 is estimated at 1.5 x 15 = 22.5 s and fits (40 s left);
    # the seed-2 pair (15 + 17 s) does not fit the 23 s left, and everything after it waits.
    manifest = experiment(ckpt, out, 1)
    assert status(manifest) == {"none": "done", "lora-s1": "done", "echo-lora-s1": "done", "lora-s2": "skipped",
                                "echo-lora-s2": "skipped", "dora-s1": "skipped", "echo-dora-s1": "skipped",
                                "dora-s2": "skipped", "echo-dora-s2": "skipped"}
    assert manifest["runs"]["lora-s2"]["estimate_seconds"] == 15
    assert manifest["runs"]["lora-s2"]["seconds_left"] == 23
    assert manifest["runs"]["dora-s1"]["estimate_seconds"] == 1.5 * 17  # not timed: the slowest run x 1.5
    assert "not run yet (over the budget, or cut short): lora-s2, echo-lora-s2, dora-s1" in \
        (out / "results.md").read_text()
    finished = {name: (out / name / "results.json").stat().st_mtime_ns for name in ("none", "lora-s1", "echo-lora-s1")}

    # Call 2, two minutes, killed in dora-s1's training after its first checkpoint.
    original = train.save_checkpoint

    def crash_in_dora_s1(path, step, *args):
        original(path, step, *args)
        if path.parent.name == "dora-s1":
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(train, "save_checkpoint", crash_in_dora_s1)
    with pytest.raises(KeyboardInterrupt):
        experiment(ckpt, out, 2)
    monkeypatch.setattr(train, "save_checkpoint", original)
    manifest = json.loads((out / "experiment.json").read_text())
    assert status(manifest)["dora-s1"] == "running" and status(manifest)["echo-lora-s2"] == "done"

    # Call 3: the finished runs are kept as they are, dora-s1 resumes from its checkpoint, and
    # the rest fits (its own train time is not timed: the DoRA estimates come from the others).
    manifest = experiment(ckpt, out, 2)
    assert set(status(manifest).values()) == {"done"}
    assert manifest["runs"]["dora-s1"]["resumed"] and manifest["runs"]["dora-s1"]["train_seconds"] is None
    assert {name: (out / name / "results.json").stat().st_mtime_ns for name in finished} == finished
    metrics = [json.loads(line) for line in (out / "dora-s1" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]  # one log, continued: no step twice

    # The raw files of every run, from the real test sets.
    gold = {d: [r["answer"] for r in json.loads((DATA / d / "test.json").read_text())[:3]] for d in SETS}
    for name in status(manifest):
        files = {"results.json", "predictions.jsonl"} | ({"config.json", "metrics.jsonl"} if name != "none" else set())
        assert all((out / name / f).is_file() for f in files), name
        predictions = read_predictions(out / name)
        assert {d: [p["gold"] for p in predictions if p["dataset"] == d] for d in SETS} == gold
        assert all(p["correct"] == (p["answer"] == p["gold"]) for p in predictions)
    assert json.loads((out / "echo-dora-s2" / "config.json").read_text())["config"]["seed"] == 2

    # The table, recomputed from predictions.jsonl.
    table = (out / "results.md").read_text()
    for method in bench.METHOD_ORDER:
        folders = ["none"] if method == "none" else [f"{method}-s1", f"{method}-s2"]
        assert expected_row(out, method, folders) in table, method
    for echo in ("echo-lora", "echo-dora"):
        gained, lost = flips(out, echo, echo.removeprefix("echo-"), (1, 2))
        assert f"right only with Echo: {gained}, right only without: {lost}." in table
    assert len({line.split("|")[-2] for line in table.splitlines() if line.startswith("| ") and "±" in line}) > 1
    assert "not run yet" not in table and len(manifest["calls"]) == 3

    # Only the table (budget 0): nothing runs; other settings in the same folder: refused.
    experiment(ckpt, out, 0)
    assert (out / "results.md").read_text() == table
    with pytest.raises(SystemExit, match=r"its runs were made with other settings \(train_flags: .*--lr 1e-2"):
        bench.main(["--suite", "experiment", "--ckpt", str(ckpt), "--data-dir", str(DATA), "--out", str(out),
                    "--train-flags=--max-steps 3 --device cpu", TOY[1]])


def test_experiment_bad_input_is_one_line(ckpt, tmp_path, capsys):
    base = ["--suite", "experiment", "--ckpt", str(ckpt), "--out", str(tmp_path / "x")]

    def error(*argv) -> str:
        with pytest.raises(SystemExit) as stopped:
            bench.main(base + list(argv))
        return str(stopped.value.code) if stopped.value.code != 2 else capsys.readouterr().err.splitlines()[-1]

    assert "--train-flags: --seed is given to each run by the experiment itself" in error(
        "--data-dir", str(DATA), "--train-flags=--seed 3")
    (tmp_path / "data" / "boolq").mkdir(parents=True)
    assert "no ARC-Easy/train.json, ARC-Easy/test.json, ARC-Challenge/train.json, ARC-Challenge/test.json, " \
           "boolq/train.json" in error("--data-dir", str(tmp_path / "data"))
    assert "--seeds must be distinct" in error("--seeds", "1", "1")
    assert "--budget-minutes must be >= 0 and finite, found nan" in error("--budget-minutes", "nan")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    assert "holds files but no experiment.json" in error("--data-dir", str(DATA))
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"


def test_echo_flags_reach_the_echo_runs_alone(ckpt, tmp_path, simulated_time):
    """An ablation (here: every sample routed, no distillation) beside its paired base runs: the
    echo runs' config.json records the flags, the LoRA runs' the defaults, and the table says so."""
    out = tmp_path / "ablation"
    manifest = experiment(ckpt, out, 60, "--method", "lora", "echo-lora",
                          "--echo-flags=--echo-route-p 1 --echo-distill 0")
    assert set(status(manifest).values()) == {"done"}
    for seed in (1, 2):
        echo = json.loads((out / f"echo-lora-s{seed}" / "config.json").read_text())["config"]
        base = json.loads((out / f"lora-s{seed}" / "config.json").read_text())["config"]
        assert (echo["echo_route_p"], echo["echo_distill"]) == (1.0, 0.0)
        assert (base["echo_route_p"], base["echo_distill"]) == (0.5, 1.0)  # the defaults, unused by LoRA
    assert "the Echo runs also `--echo-route-p 1 --echo-distill 0`" in (out / "results.md").read_text()
