"""scripts/experiment.py, the real-model experiment runner, and scripts/figure.py.

- The runner's decisions, exactly: train.py and eval.py replaced by stand-ins that parse their
  commands with the real parsers and write the files a run leaves, so which runs start, in which
  order, and that a rerun continues (also after a run that stopped mid-training) is known.
- One end-to-end experiment at toy scale on CPU: real `python train.py` and `python eval.py`
  subprocesses for the untouched model, LoRA, Echo-LoRA and the control, a tiny random LLaMA with
  the real LLaMA-2 tokenizer, real ARC records (tests/assets slices), the control's training
  killed after its first checkpoint and resumed by the next call.
- The table (results.md) on fixture runs whose numbers are worked out by hand, and the figure.
"""

import dataclasses
import hashlib
import json
import math
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

import eval as evaluator
import llama
import train
from conftest import ASSETS, ROOT
from data.files import RUN_MARKER
from data.tokenizer import Tokenizer
from reference import write_meta_folder

sys.path.insert(0, str(ROOT / "scripts"))
import experiment  # noqa: E402
import figure  # noqa: E402

DATA = ASSETS / "data" / "commonsense"  # training splits and test sets, real records
TOKENIZER = ASSETS / "models" / "llama2-tokenizer" / "tokenizer.model"
SETS = ["ARC-Easy", "ARC-Challenge"]


def option(args: list[str], name: str) -> str:
    return args[len(args) - 1 - args[::-1].index(name) + 1]  # the last one given wins, as in argparse


class StandIn:
    """`python train.py` and `python eval.py` as experiment.run_script sees them: each command is
    parsed by the script's own parser and recorded, and the files a finished run leaves are written (a run named in `stop`
    leaves only its checkpoint and exits with 1, as a killed run would)."""

    def __init__(self, monkeypatch):
        self.commands, self.stop = [], set()
        monkeypatch.setattr(experiment, "run_script", self)

    def __call__(self, script: str, args: list[str]) -> int:
        out = Path(option(args, "--out"))
        self.commands.append((script, out.name, args))
        if script == "eval.py":
            parsed = evaluator.parse_args(args)
            assert (out / f"results{evaluator.results_suffix(parsed)}.json").exists() == parsed.overwrite
            correct = {d: [(i + len(out.name)) % 3 == 0 for i in range(4)] for d in parsed.datasets}
            write_run(out, None, None, correct, write_config=False, suffix=evaluator.results_suffix(parsed),
                      **{k: getattr(parsed, k) for k in ("ckpt", "scoring", "num_beams", "max_new_tokens", "limit",
                                                         "precision")})
            return 0
        cfg = train.parse_config(args)
        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoint.pt").write_text("a checkpoint")
        if out.name in self.stop:
            self.stop.remove(out.name)
            return 1
        record = {RUN_MARKER: 1, "config": dataclasses.asdict(cfg), "train_records": 8}
        (out / "config.json").write_text(json.dumps(record))
        (out / "adapter.safetensors").write_text("an adapter")
        return 0

    def started(self, script: str) -> list[str]:
        return [name for s, name, _ in self.commands if s == script]


def stand_in_experiment(tmp_path, *extra):
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    experiment.main(["--ckpt", str(tmp_path / "ckpt"), "--data-dir", str(DATA), "--out", str(tmp_path / "exp"),
                     "--seeds", "1", "2", *extra])


def test_every_arm_and_seed_runs_in_order_and_a_rerun_continues(tmp_path, monkeypatch):
    scripts = StandIn(monkeypatch)
    # Call 1: the untouched model, each seed's LoRA, Echo-LoRA and control, then each seed's DoRA
    # and Echo-DoRA; dora-s1 stops mid-training (exit code 1), and nothing after it starts.
    scripts.stop = {"dora-s1"}
    with pytest.raises(SystemExit, match="dora-s1: train.py stopped with exit code 1; the same command continues"):
        stand_in_experiment(tmp_path)
    assert scripts.started("train.py") == [f"{arm}-s{seed}" for seed in (1, 2)
                                           for arm in ("lora", "echo-lora", "echo-lora-control")] + ["dora-s1"]
    assert scripts.started("eval.py") == ["none"] + scripts.started("train.py")[:-1]

    # The commands, as a user would type them: the arms' methods and flags, the training sets
    # together, the test sets, the adapter.
    train_args = {name: args for s, name, args in scripts.commands if s == "train.py"}
    data = f"{DATA / 'ARC-Easy' / 'train.json'},{DATA / 'ARC-Challenge' / 'train.json'}"
    control = train.parse_config(train_args["echo-lora-control-s1"])
    assert (control.method, control.echo_inject, control.seed, control.data, control.epochs) == \
        ("echo-lora", "zero", 1, data, 1)
    assert train.parse_config(train_args["echo-lora-s1"]).echo_inject == "echo"
    evaluation = evaluator.parse_args(next(a for s, n, a in scripts.commands if (s, n) == ("eval.py", "lora-s1")))
    assert (evaluation.datasets, evaluation.adapter, evaluation.num_beams) == (SETS, tmp_path / "exp" / "lora-s1", 1)
    assert "--adapter" not in next(a for s, n, a in scripts.commands if n == "none")

    # Call 2: the evaluated runs are kept as they are, dora-s1 resumes from its checkpoint, the rest runs.
    scripts.commands.clear()
    stand_in_experiment(tmp_path)
    assert scripts.started("train.py") == ["dora-s1", "echo-dora-s1", "dora-s2", "echo-dora-s2"]
    assert "--resume" in scripts.commands[0][2] and "--resume" not in scripts.commands[2][2]
    assert (tmp_path / "exp" / "results.md").read_text() == experiment.results_markdown(
        experiment.run_folders(tmp_path / "exp"))


def test_echo_flags_reach_the_echo_runs_alone(tmp_path, monkeypatch):
    """An ablation (every sample routed, no distillation) beside its paired base runs; --arms and
    --seeds restrict the runs."""
    scripts = StandIn(monkeypatch)
    stand_in_experiment(tmp_path, "--arms", "lora", "echo-lora", "echo-lora-control",
                        "--echo-flags=--echo-route-p 1 --echo-distill 0", "--eval-flags=--limit 4")
    assert scripts.started("train.py") == [f"{arm}-s{seed}" for seed in (1, 2)
                                           for arm in ("lora", "echo-lora", "echo-lora-control")]
    for s, name, args in scripts.commands:
        if s == "train.py":
            cfg = train.parse_config(args)
            assert (cfg.echo_route_p, cfg.echo_distill) == ((0.5, 1.0) if name.startswith("lora") else (1.0, 0.0))
        else:
            assert evaluator.parse_args(args).limit == 4
    table = (tmp_path / "exp" / "results.md").read_text()
    assert "  - echo-lora: `--echo-route-p=1 --echo-distill=0`" in table
    assert "  - echo-lora-control: `--echo-route-p=1 --echo-distill=0 --echo-inject=zero`" in table


def test_another_scoring_reads_and_writes_its_own_files(tmp_path, monkeypatch):
    """eval.py --scoring cloze writes results-cloze.json and predictions-cloze.jsonl: the runner
    and the table read those (a rerun finds the runs evaluated), --table-only too."""
    scripts = StandIn(monkeypatch)
    stand_in_experiment(tmp_path, "--arms", "none", "lora", "--train-flags=--cloze", "--eval-flags=--scoring cloze")
    assert scripts.started("eval.py") == ["none", "lora-s1", "lora-s2"]
    assert (tmp_path / "exp" / "lora-s1" / "predictions-cloze.jsonl").is_file()
    assert not (tmp_path / "exp" / "lora-s1" / "results.json").exists()
    stand_in_experiment(tmp_path, "--arms", "none", "lora", "--train-flags=--cloze", "--eval-flags=--scoring cloze")
    assert len(scripts.commands) == 5  # nothing run again
    table = (tmp_path / "exp" / "results.md").read_text()
    assert "- evaluation: eval.py, Cloze ranking:" in table and "| lora | 1, 2 |" in table
    (tmp_path / "exp" / "results.md").unlink()
    assert experiment.main(["--table-only", "--out", str(tmp_path / "exp")]) == table
    with pytest.raises(SystemExit, match="no evaluated run"):  # no generate-scored runs there
        experiment.main(["--table-only", "--out", str(tmp_path / "exp"), "--scoring", "generate"])
    with pytest.raises(SystemExit):
        experiment.main(["--table-only", "--out", str(tmp_path / "exp"), "--scoring", "no-such"])
    assert figure.main([str(tmp_path / "exp")]).is_file()  # the figure reads the experiment's scoring too


def test_bad_input_is_one_line_and_runs_nothing(tmp_path, monkeypatch, capsys):
    scripts = StandIn(monkeypatch)
    (tmp_path / "ckpt").mkdir()
    out = tmp_path / "x"
    base = ["--ckpt", str(tmp_path / "ckpt"), "--data-dir", str(DATA), "--out", str(out)]

    def error(*argv) -> str:
        with pytest.raises(SystemExit) as stopped:
            experiment.main(base + list(argv))
        return str(stopped.value.code) if stopped.value.code != 2 else capsys.readouterr().err.strip().splitlines()[-1]

    # the runner's own flags, also abbreviated as train.py's and eval.py's parsers read them
    assert "--train-flags: --seed is given to each run by the experiment itself" in error("--train-flags=--seed 3")
    assert "unrecognized arguments: --see" in error("--train-flags=--see 3")  # no abbreviation in train.py either
    assert "--echo-flags: --echo-inject is given" in error("--echo-flags=--echo-inject zero")
    assert "--eval-flags: --data-dir, --datasets is given" in error("--eval-flags=--datasets boolq --data-dir d")
    assert "--train-flags" in error("--train-flags=--no-such-flag")
    assert "--lr must be >= 0" in error("--train-flags=--lr -1")
    assert "unrecognized arguments: --echo x" in error("--echo", "x")  # no abbreviations here either
    assert "--test-sets: unknown dataset 'mmlu'" in error("--test-sets", "mmlu")
    assert "no ARC-Easy/train.json, ARC-Challenge/train.json, ARC-Easy/test.json, ARC-Challenge/test.json " \
           "(python data/download.py --only ARC-Easy ARC-Challenge ARC-Easy-train ARC-Challenge-train" in error(
               "--data-dir", str(tmp_path))
    assert "--seeds must be distinct" in error("--seeds", "1", "1")
    assert "--runs, --scoring, --readme and --forms go with --table-only" in error("--runs", str(tmp_path))
    assert "--runs, --scoring, --readme and --forms go with --table-only" in error("--readme", "README.md")
    assert scripts.commands == [] and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# --------------------------------------------------------------------------------------------
# End to end, at toy scale: the real scripts


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """dim 64, 2 blocks, weights of std 0.2 (replies depend on the question), and an output head
    that can only write the pieces of the labels: greedy replies name labels, some right, and a
    few training steps flip some of them."""
    tokenizer = Tokenizer(TOKENIZER)
    pieces = sorted(set(tokenizer.encode("answer1 answer2 answer3 answer4 answer5", bos=False, eos=False)))
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


KILLED = "echo-lora-control-s1"
KILL_AFTER_CHECKPOINT = """
import os, sys
sys.path.insert(0, {root!r})
import train
save = train.save_checkpoint
def save_then_die(*args):
    save(*args)
    os._exit(137)  # as a kill -9 leaves it: no clean-up
train.save_checkpoint = save_then_die
train.main(sys.argv[1:])
"""


def test_experiment_end_to_end_with_the_real_scripts(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "experiment"
    killer = tmp_path / "kill_after_checkpoint.py"
    killer.write_text(KILL_AFTER_CHECKPOINT.format(root=str(ROOT)))
    real = experiment.run_script

    def kill_control(script, args):  # the control's training dies after its first checkpoint, once
        if script == "train.py" and Path(option(args, "--out")).name == KILLED and not killer.with_suffix(".done").exists():
            killer.with_suffix(".done").touch()
            script = str(killer)
        return real(script, args)

    monkeypatch.setattr(experiment, "run_script", kill_control)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["--ckpt", str(ckpt), "--data-dir", str(DATA), "--out", str(out), "--seeds", "1",
            "--arms", "none", "lora", "echo-lora", "echo-lora-control",
            "--train-flags=--max-steps 3 --batch-size 4 --micro-batch-size 4 --val-size 4 --warmup-steps 1 "
            "--eval-every 3 --save-every 2 --cutoff 160 --lr 1e-2 --device cpu",
            "--echo-flags=--echo-route-p 1", "--eval-flags=--limit 3 --device cpu"]
    with pytest.raises(SystemExit, match=f"{KILLED}: train.py stopped with exit code 137"):
        experiment.main(argv)
    finished = {name: (out / name / "results.json").stat().st_mtime_ns for name in ("none", "lora-s1", "echo-lora-s1")}
    assert (out / KILLED / "checkpoint.pt").is_file() and not (out / KILLED / "results.json").exists()

    table = experiment.main(argv)  # continues: the control from its checkpoint
    assert {name: (out / name / "results.json").stat().st_mtime_ns for name in finished} == finished
    metrics = [json.loads(line) for line in (out / KILLED / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]  # one log, continued: no step twice

    # The raw files of every run, from the real test sets; the control's configuration.
    gold = {d: [r["answer"] for r in json.loads((DATA / d / "test.json").read_text())[:3]] for d in SETS}
    for name in ("none", "lora-s1", "echo-lora-s1", KILLED):
        files = {"results.json", "predictions.jsonl"} | ({"config.json", "metrics.jsonl"} if name != "none" else set())
        assert all((out / name / f).is_file() for f in files), name
        predictions = [json.loads(line) for line in (out / name / "predictions.jsonl").read_text().splitlines()]
        assert {d: [p["gold"] for p in predictions if p["dataset"] == d] for d in SETS} == gold
    control = json.loads((out / "echo-lora-control-s1" / "config.json").read_text())["config"]
    assert (control["method"], control["echo_inject"], control["echo_route_p"]) == ("echo-lora", "zero", 1.0)
    echo_metrics = [json.loads(line) for line in (out / "echo-lora-s1" / "metrics.jsonl").read_text().splitlines()]
    assert all("echo_diag_ce_echo" in m for m in echo_metrics if m["step"] > 0)  # every sample routed

    # The table: from the run folders; each arm's row recomputed here from predictions.jsonl.
    assert (out / "results.md").read_text() == table == experiment.results_markdown(experiment.run_folders(out))
    for arm in ("none", "lora", "echo-lora", "echo-lora-control"):
        folder = out / experiment.run_name(arm, None if arm == "none" else 1)
        predictions = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        per_set = [100 * sum(p["correct"] for p in predictions if p["dataset"] == d) / 3 for d in SETS]
        row = f"| {'none (untouched)' if arm == 'none' else arm} | {'-' if arm == 'none' else 1} | " + \
            " | ".join(f"{v:.1f}" for v in per_set + [sum(per_set) / 2]) + " |"
        assert row in table, row
    for pair in ("echo-lora vs lora | 1 |", "echo-lora vs echo-lora-control | 1 |"):
        assert pair in table


# --------------------------------------------------------------------------------------------
# The table and the figure, on fixture runs


def write_run(folder, arm, seed, correct_by_set, write_config=True, metrics=(), results=None, sealed=True,
              suffix="", **eval_args):
    """An evaluated run as train.py and eval.py leave it: config.json (not for the untouched
    model), metrics.jsonl, predictions.jsonl and results.json; `results` stands in for a
    results.json that says otherwise than its predictions; `sealed`: results.json records the
    predictions' SHA-256, as eval.py writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    def prediction(d, i, c):  # right: the gold label; wrong: another label of the benchmark
        gold, other = evaluator.BENCHMARKS[d].labels.split("|")[:2]
        return {"dataset": d, "index": i, "generated": "", "answer": gold if c else other, "gold": gold, "correct": c}

    predictions = [prediction(d, i, c) for d, flags in correct_by_set.items() for i, c in enumerate(flags)]
    args = {"ckpt": "checkpoints/smollm2-135m", "scoring": "generate", "num_beams": 1, "max_new_tokens": 32,
            "limit": None, "precision": "fp32", **eval_args}
    lines = "".join(json.dumps(p) + "\n" for p in predictions)
    (folder / f"predictions{suffix}.jsonl").write_text(lines)
    summary = {"results": results or {d: {"accuracy": sum(f) / len(f), "correct": sum(f), "n": len(f)}
                                      for d, f in correct_by_set.items()}, "args": args}
    if sealed:
        summary["predictions_sha256"] = hashlib.sha256(lines.encode()).hexdigest()
    (folder / f"results{suffix}.json").write_text(json.dumps(summary))
    if write_config and arm != "none":
        config = dataclasses.asdict(train.Config(method=arm.removesuffix("-control"), seed=seed, lr=3e-4, epochs=1,
                                                 data="data/ARC-Easy/train.json,data/ARC-Challenge/train.json",
                                                 echo_inject="zero" if arm.endswith("-control") else "echo"))
        (folder / "config.json").write_text(json.dumps({RUN_MARKER: 1, "config": config, "train_records": 3250}))
        (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return folder


T, F = True, False


@pytest.fixture
def fixture_runs(tmp_path):
    """Accuracies (%) per seed, ARC-Easy / ARC-Challenge -> average:
    lora 25/50 -> 37.5, 50/50 -> 50; echo-lora 75/25 -> 50, 50/75 -> 62.5; the control 50/50 -> 50,
    25/25 -> 25; none 0/25 -> 12.5."""
    out = tmp_path / "exp"
    diag = [{"step": 0, "val_loss": 2.0}, {"step": 1, "loss": 1.5, "echo_diag_ce_plain": 1.4, "echo_diag_ce_echo": 1.3,
                                           "echo_diag_gate": 0.12},
            {"step": 2, "loss": 1.2}, {"step": 3, "loss": 1.1, "echo_diag_ce_plain": 1.0, "echo_diag_ce_echo": 0.8,
                                       "echo_diag_gate": 0.2}]
    write_run(out / "lora-s1", "lora", 1, {"ARC-Easy": [T, F, F, F], "ARC-Challenge": [T, T, F, F]})
    write_run(out / "lora-s2", "lora", 2, {"ARC-Easy": [T, T, F, F], "ARC-Challenge": [T, T, F, F]})
    write_run(out / "echo-lora-s1", "echo-lora", 1, {"ARC-Easy": [T, T, T, F], "ARC-Challenge": [F, T, F, F]},
              metrics=diag)
    write_run(out / "echo-lora-s2", "echo-lora", 2, {"ARC-Easy": [T, T, F, F], "ARC-Challenge": [T, T, T, F]},
              metrics=diag)
    write_run(out / "echo-lora-control-s1", "echo-lora-control", 1,
              {"ARC-Easy": [T, T, F, F], "ARC-Challenge": [T, F, T, F]}, metrics=diag[:2])
    write_run(out / "echo-lora-control-s2", "echo-lora-control", 2,
              {"ARC-Easy": [F, F, F, T], "ARC-Challenge": [F, F, F, T]}, metrics=diag[:1])
    write_run(out / "none", "none", None, {"ARC-Easy": [F, F, F, F], "ARC-Challenge": [T, F, F, F]})
    return out


def test_table_means_over_seeds_and_pairs_seed_by_seed(fixture_runs):
    folders = experiment.run_folders(fixture_runs)
    text = experiment.results_markdown(folders)
    assert "| arm | seeds | ARC-e | ARC-c | Average |" in text
    # lora: ARC-e 25, 50 -> 37.5 ± 17.7; averages 37.5, 50 -> 43.75 ± 8.8 (rounded half to even: 43.8)
    assert "| lora | 1, 2 | 37.5 ± 17.7 | 50.0 ± 0.0 | 43.8 ± 8.8 |" in text
    assert "| echo-lora | 1, 2 | 62.5 ± 17.7 | 50.0 ± 35.4 | 56.2 ± 8.8 |" in text
    assert "| echo-lora-control | 1, 2 | 37.5 ± 17.7 | 37.5 ± 17.7 | 37.5 ± 17.7 |" in text
    assert "| none (untouched) | - | 0.0 | 25.0 | 12.5 |" in text
    assert text.index("| none") < text.index("| lora") < text.index("| echo-lora |") < text.index("| echo-lora-control")
    # echo vs lora: seed 1 gains ARC-e 1, 2 and loses ARC-c 0 (2 / 1), seed 2 gains ARC-c 2 (1 / 0)
    assert "| echo-lora vs lora | 1 | 50.0 | 37.5 | +12.5 | 2 | 1 | 1 |" in text
    assert "| echo-lora vs lora | 2 | 62.5 | 50.0 | +12.5 | 1 | 0 | 1 |" in text
    assert "| echo-lora vs lora | pooled (2) | 56.2 ± 8.8 | 43.8 ± 8.8 | +12.5 ± 0.0 | 3 | 1 | 0.625 |" in text
    # echo vs the control, seed 2: echo right on ARC-e 0, 1 and ARC-c 0, 1, 2; control on ARC-e 3, ARC-c 3
    assert "| echo-lora vs echo-lora-control | 2 | 62.5 | 25.0 | +37.5 | 5 | 2 | 0.453 |" in text
    # the control vs lora, seed 1: the control gains ARC-e 1 and ARC-c 2, loses ARC-c 1
    assert "| echo-lora-control vs lora | 1 | 50.0 | 37.5 | +12.5 | 2 | 1 | 1 |" in text
    # diagnostics: the first step's value -> the mean of the last 20 steps (here steps 1 and 3); a
    # key a run never logs is "-", a run with no diagnostics has no row
    assert "| echo-lora-s1 | 0.120 -> 0.160 | - | 1.400 -> 1.200 | 1.300 -> 1.050 | - |" in text
    assert "| echo-lora-control-s1 | 0.120 -> 0.120 | - | 1.400 -> 1.400 | 1.300 -> 1.300 | - |" in text
    assert "echo-lora-control-s2 |" not in text.split("## The Echo path's diagnostics")[1]
    assert "- training: train.py on the training splits of ARC-Easy, ARC-Challenge (3250 records), every field " \
           "at train.py's default except `--lr=0.0003 --epochs=1`" in text
    assert "  - echo-lora-control: `--echo-inject=zero`" in text and "  - lora:" not in text
    assert "- evaluation: eval.py, Greedy decoding, at most 32 new tokens; fp32 weights; every question of " \
           "ARC-Easy, ARC-Challenge" in text
    # the same folder given twice, or through a link, counts once, and the table says so
    (fixture_runs.parent / "link").symlink_to(fixture_runs / "echo-lora-s1")
    again = experiment.results_markdown(folders + folders[:1] + [fixture_runs.parent / "link"])
    assert again == text + f"\n- {folders[0]} is {folders[0]} given again: counted once\n" \
        f"- {fixture_runs.parent / 'link'} is {fixture_runs / 'echo-lora-s1'} given again: counted once\n"


def test_table_only_writes_the_functions_table_from_the_raw_files(fixture_runs, capsys):
    before = sorted(p.relative_to(fixture_runs) for p in fixture_runs.rglob("*"))
    experiment.main(["--table-only", "--out", str(fixture_runs)])
    assert (fixture_runs / "results.md").read_text() == experiment.results_markdown(
        experiment.run_folders(fixture_runs)) == capsys.readouterr().out.removesuffix("\n")
    assert sorted(p.relative_to(fixture_runs) for p in fixture_runs.rglob("*")) == sorted(before + [Path("results.md")])
    # any evaluated runs, written into --out
    experiment.main(["--table-only", "--out", str(fixture_runs / "two"), "--runs", str(fixture_runs / "lora-s1"),
                     str(fixture_runs / "echo-lora-s1")])
    assert "| echo-lora vs lora | 1 |" in (fixture_runs / "two" / "results.md").read_text()


def test_forms_table_sets_experiments_side_by_side_with_each_ones_pairs_and_gaps(fixture_runs, tmp_path):
    """Two experiment folders as two forms: one accuracy table, each form's pairs, every Echo run's
    CE(echo) - CE(plain) (fixture: -0.1 at step 1, -0.2 at step 3) and a positive control's."""
    other = tmp_path / "other"
    for name in ("lora-s1", "echo-lora-s1"):
        shutil.copytree(fixture_runs / name, other / name)
    experiment.main(["--table-only", "--out", str(tmp_path / "both"), "--forms", f"first={fixture_runs}",
                     f"second={other}", "--diagnostics-runs", str(fixture_runs / "echo-lora-s2")])
    text = (tmp_path / "both" / "results.md").read_text()
    assert "| lora | 1, 2 | 37.5 ± 17.7 | 50.0 ± 0.0 | 43.8 ± 8.8 | 1 | 25.0 | 50.0 | 37.5 |" in text
    assert "| echo-lora-control | 1, 2 | 37.5 ± 17.7 | 37.5 ± 17.7 | 37.5 ± 17.7 | - | - | - | - |" in text
    assert "## Paired, seed by seed: first" in text and "## Paired, seed by seed: second" in text
    second = text.split("## Paired, seed by seed: second")[1]
    assert "| echo-lora vs lora | 1 | 50.0 | 37.5 | +12.5 | 2 | 1 | 1 |" in second and "| pooled" not in second
    assert "| first: echo-lora-s1 | -0.1000 | -0.1500 | -0.1500 | - | 0.160 | - |" in text
    assert "| exp/echo-lora-s2 | -0.1000 | -0.1500 | -0.1500 | - | 0.160 | - |" in text
    with pytest.raises(SystemExit):
        experiment.main(["--table-only", "--out", str(tmp_path), "--forms", f"first={fixture_runs}", "second"])


def test_table_refuses_runs_it_cannot_compare_and_counts_unpaired_questions(fixture_runs):
    write_run(fixture_runs / "other" / "lora-s1", "lora", 1, {"ARC-Easy": [T, T, T, T]})
    with pytest.raises(ValueError, match=r"two runs of lora-s1: .*exp/lora-s1 and .*other/lora-s1"):
        experiment.results_markdown([fixture_runs / "lora-s1", fixture_runs / "other" / "lora-s1"])
    for setting in ({"limit": 2}, {"num_beams": 4}, {"scoring": "likelihood"}):
        shutil.rmtree(fixture_runs / "other")
        write_run(fixture_runs / "other" / "lora-s3", "lora", 3, {"ARC-Easy": [T, T, T, T]}, **setting)
        with pytest.raises(SystemExit, match=f"--{next(iter(setting)).replace('_', '-')} .*other/lora-s3"):
            experiment.main(["--table-only", "--out", str(fixture_runs), "--runs", str(fixture_runs / "lora-s1"),
                             str(fixture_runs / "other" / "lora-s3")])
    write_run(fixture_runs / "short" / "echo-lora-s1", "echo-lora", 1,
              {"ARC-Easy": [T, T, F], "ARC-Challenge": [F, T, F, F]})
    text = experiment.results_markdown([fixture_runs / "lora-s1", fixture_runs / "short" / "echo-lora-s1"])
    assert "| echo-lora vs lora | 1 | 45.8 | 37.5 | +8.3 | 1 | 1 | 1 |" in text
    assert "- echo-lora vs lora, seed 1: 1 questions not in both runs are left out of the flips" in text
    shutil.copytree(fixture_runs / "echo-lora-s1", fixture_runs / "echo-copy")  # the same run under another name
    with pytest.raises(SystemExit, match=r"two runs of echo-lora-s1: .*echo-copy and .*exp/echo-lora-s1"):
        experiment.main(["--table-only", "--out", str(fixture_runs)])
    shutil.rmtree(fixture_runs / "echo-copy")
    (fixture_runs / "none" / "predictions.jsonl").write_text("{not json\n")
    (fixture_runs / "none" / "results.json").write_text(json.dumps({"args": {"scoring": "generate"}}))  # unsealed
    with pytest.raises(SystemExit, match=r"none/predictions.jsonl: line 1 is not a prediction"):
        experiment.main(["--table-only", "--out", str(fixture_runs)])


def test_table_takes_accuracies_and_flips_from_the_predictions_they_were_written_with(tmp_path):
    lora = write_run(tmp_path / "lora-s1", "lora", 1, {"ARC-Easy": [T, F]}, results={"ARC-Easy": {"accuracy": 1.0}},
                     sealed=False)  # an old results.json that disagrees with its predictions
    echo = write_run(tmp_path / "echo-lora-s1", "echo-lora", 1, {"ARC-Easy": [T, T]})
    assert "| lora | 1 | 50.0 | 50.0 |" in experiment.results_markdown([lora, echo])
    (echo / "predictions.jsonl").write_text((echo / "predictions.jsonl").read_text().replace("true", "false", 1))
    with pytest.raises(ValueError, match="echo-lora-s1/predictions.jsonl: not the predictions .*results.json was "
                                         "written with"):
        experiment.results_markdown([lora, echo])
    (echo / "predictions.jsonl").write_text('{"dataset": "ARC-Easy", "index": 0, "answer": "answer1", "gold": "answer1", '
                                            '"correct": true}\n' * 2)
    (echo / "results.json").write_text(json.dumps({"args": {}}))
    with pytest.raises(ValueError, match="line 2: ARC-Easy item 0 is predicted twice"):
        experiment.results_markdown([lora, echo])


def test_mcnemar_p_is_the_exact_binomial_test_by_its_definition():
    """The two-sided exact test as defined (the summed chances of every split of the flips no more
    likely than the one seen, each flip a fair coin), written out with exact fractions."""
    def by_definition(gained, lost):
        n = gained + lost
        chance = [Fraction(math.comb(n, k), 2**n) for k in range(n + 1)]
        return float(sum(c for c in chance if c <= chance[gained]))

    for gained, lost in [(0, 0), (3, 1), (1, 3), (5, 5), (10, 0), (7, 2), (40, 25), (600, 540)]:
        assert experiment.mcnemar_exact_p(gained, lost) == pytest.approx(by_definition(gained, lost), rel=1e-12)


def test_figure_is_a_png_from_the_raw_files(fixture_runs):
    """As a user runs it: `python scripts/figure.py DIR` (the curves skip the steps without the key)."""
    assert experiment.curve(fixture_runs / "echo-lora-s1", "echo_diag_gate") == ([1, 3], [0.12, 0.2])
    assert experiment.curve(fixture_runs / "lora-s1", "echo_diag_gate") == ([], [])
    steps, gaps = figure.difference(fixture_runs / "echo-lora-s1", "echo_diag_ce_echo", "echo_diag_ce_plain")
    assert steps == [1, 3] and gaps == pytest.approx([1.3 - 1.4, 0.8 - 1.0])
    assert figure.running_mean([1.0, 2.0, 3.0, 5.0], 2) == [1.0, 1.5, 2.5, 4.0]  # each value and the one before it
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "figure.py"), str(fixture_runs)],
                          capture_output=True, text=True, cwd=fixture_runs)
    assert done.returncode == 0, done.stderr
    data = (fixture_runs / "figure.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_every_flag_states_its_default_and_no_abbreviations():
    parser = experiment.arg_parser()
    assert not parser.allow_abbrev
    for action in parser._actions[1:]:
        assert "default" in action.help or "required" in action.help, action.option_strings


def test_the_readme_shows_the_table_made_from_the_committed_runs():
    """README's results table is the one `python scripts/experiment.py --table-only --forms` makes from
    the committed run folders of the two loss forms, line for line: no number typed by hand."""
    runs = ROOT / "results" / "smollm2-cpu"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    shown = readme.split("<!-- results.md: begin -->")[1].split("<!-- results.md: end -->")[0].strip()
    forms = {"answer-only": runs / "experiment", "whole-text": runs / "whole-text", "answer-only-up-own": runs / "up-own"}
    made = experiment.forms_markdown(forms, [])
    assert "| lora | 1, 2, 3 |" in shown and shown == experiment.results_block(made).strip()


def test_table_only_puts_the_tables_into_the_readme_between_its_markers_only(fixture_runs, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nBefore.\n<!-- results.md: begin -->\nold table\n<!-- results.md: end -->\n\nAfter.\n")
    text = experiment.main(["--table-only", "--out", str(fixture_runs), "--readme", str(readme)])
    head, rest = readme.read_text().split("<!-- results.md: begin -->\n")
    block, tail = rest.split("<!-- results.md: end -->")
    assert head == "# Title\n\nBefore.\n" and tail == "\n\nAfter.\n"
    assert block.startswith("**Accuracy (%), mean ± std over seeds**\n\n| arm |") and "## " not in block
    assert block == experiment.results_block(text) and "| echo-lora-control | 1, 2 |" in block and "**Paired" not in block
    unmarked = tmp_path / "other.md"
    unmarked.write_text("no markers\n")
    with pytest.raises(SystemExit, match=r"other.md: needs one <!-- results.md: begin --> line and one "
                                         r"<!-- results.md: end --> line after it"):
        experiment.main(["--table-only", "--out", str(fixture_runs), "--readme", str(unmarked)])
    assert unmarked.read_text() == "no markers\n"
