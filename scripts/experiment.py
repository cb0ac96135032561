"""The real-model experiment: Echo-LoRA against LoRA and against its control, Echo-DoRA against DoRA.

    python scripts/experiment.py --ckpt smollm2-135m --data-dir data --out results/smollm2-cpu/experiment
    python scripts/experiment.py --table-only --out results/smollm2-cpu/experiment   # results.md again, nothing run
    python scripts/experiment.py --table-only --out results/smollm2-cpu/experiment --readme README.md   # and README's tables
    python scripts/figure.py results/smollm2-cpu/experiment                          # figure.png

The arms, in order: the untouched model ("none"); for each seed LoRA, Echo-LoRA and the control
("echo-lora-control": train.py --echo-inject zero); then for each seed DoRA and Echo-DoRA. Each run
is `python train.py` then `python eval.py` as a user types them, into <out>/<arm>-s<seed>/. The
same command continues the experiment: evaluated runs are kept, a run cut short resumes.

results.md is made from the run folders' own files alone: per arm the accuracy mean ± std over
seeds, the paired arms seed by seed with the questions that flip each way and the exact McNemar
test, and the Echo runs' diagnostics (first step -> the mean of the last 20).
"""

import argparse
import dataclasses
import hashlib
import json
import math
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval as evaluator  # noqa: E402  (the repo root is on sys.path from the line above)
import train  # noqa: E402
from data import checkpoints  # noqa: E402
from data.files import (EVAL_FILES, Rule, check_shape, output_files, read_bytes, read_json_shaped,  # noqa: E402
                        read_run_record, write_atomically)

# The arms: name -> (train.py --method, the arm's own train.py flags); "none": the untouched model.
ARMS = {"none": None,
        "lora": ("lora", ()), "echo-lora": ("echo-lora", ()), "echo-lora-control": ("echo-lora", ("--echo-inject", "zero")),
        "dora": ("dora", ()), "echo-dora": ("echo-dora", ())}
GROUPS = (("lora", "echo-lora", "echo-lora-control"), ("dora", "echo-dora"))  # each run seed by seed, in this order
CONTROL = "-control"  # an Echo arm trained with --echo-inject zero: its name is the Echo arm's + this
README_BEGIN, README_END = "<!-- results.md: begin -->", "<!-- results.md: end -->"
DEFAULT_SETS = ["ARC-Easy", "ARC-Challenge"]
# The experiment's departures from the recipe, before --train-flags and --eval-flags (which can undo them).
EXPERIMENT_TRAIN_FLAGS = ("--epochs", "1")  # the recipe trains 3 epochs
EXPERIMENT_EVAL_FLAGS = ("--num-beams", "1",  # greedy: a quarter of the protocol's 4-beam rows
                         "--batch-size", "128")  # eval.py's answers do not depend on it
# What the runner gives each run itself: not for the passed-through flags
RUNNER_TRAIN_FLAGS = {"ckpt", "method", "seed", "data", "out", "resume", "overwrite", "echo_inject"}
RUNNER_EVAL_FLAGS = {"ckpt", "adapter", "datasets", "data_dir", "out", "overwrite"}
COMPARED_SETTINGS = ("scoring", "num_beams", "max_new_tokens", "limit")
# train.py fields that say where or how a run ran, not what it trained
NOT_SETTINGS = {"ckpt", "method", "seed", "data", "out", "resume", "overwrite", "device", "log_every", "save_every",
                "gradient_checkpointing"}


def arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--out", type=Path, required=True, help="the experiment's folder: a folder per run, results.md "
                                                           "(required)")
    p.add_argument("--ckpt", default="smollm2-135m", help="the base model: checkpoints/NAME or a path (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=Path("data"),
                   help="folder of <name>/train.json and <name>/test.json (default: %(default)s)")
    p.add_argument("--train-sets", nargs="+", default=DEFAULT_SETS, metavar="NAME",
                   help="every run trains on <data-dir>/<name>/train.json of these together "
                        f"(default: {' '.join(DEFAULT_SETS)})")
    p.add_argument("--test-sets", nargs="+", default=DEFAULT_SETS, metavar="NAME",
                   help="every run is evaluated on <data-dir>/<name>/test.json of each, eval.py's benchmark names "
                        f"(default: {' '.join(DEFAULT_SETS)})")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS),
                   help="only these arms (default: all, in this order)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one run per arm and seed (default: 1 2 3)")
    p.add_argument("--train-flags", default="",
                   help='more train.py flags for every run, one string: --train-flags="--lr 1e-3 --precision bf16" '
                        "(the same in every call into one --out; default: none)")
    p.add_argument("--echo-flags", default="",
                   help='more train.py flags for the Echo runs only (the control is one), so an ablation keeps its '
                        'paired base runs: --echo-flags="--echo-route-p 1" (default: none)')
    p.add_argument("--eval-flags", default="",
                   help='more eval.py flags for every evaluation: --eval-flags="--limit 100" (default: none)')
    p.add_argument("--table-only", action="store_true",
                   help="run nothing: write <out>/results.md from the run folders there (default: run, then write it)")
    p.add_argument("--runs", nargs="+", type=Path, metavar="RUN",
                   help="with --table-only: tabulate these evaluated run folders instead of those in --out "
                        "(default: --out's)")
    p.add_argument("--readme", type=Path, metavar="FILE",
                   help=f"with --table-only: also put results.md's accuracy table into FILE, between its {README_BEGIN} "
                        f"and {README_END} lines (default: none)")
    p.add_argument("--scoring", help="with --table-only: eval.py --scoring's files to read (default: the runs' one)")
    p.add_argument("--forms", nargs="+", metavar="NAME=FOLDER",
                   help="with --table-only: one results.md in --out comparing experiments side by side, each an "
                        "--out folder of its own under a name: --forms answer-only=A whole-text=B (default: none)")
    p.add_argument("--diagnostics-runs", nargs="+", type=Path, default=[], metavar="RUN",
                   help="with --forms: more Echo run folders (a positive control) whose diagnostics are listed "
                        "beside the forms' (default: none)")
    return p


def main(argv=None) -> str:
    """Run the experiment (or, --table-only, only its table); returns results.md's text."""
    p = arg_parser()
    a = p.parse_args(argv)
    if not a.table_only and (a.runs or a.scoring or a.readme or a.forms):
        p.error("--runs, --scoring, --readme and --forms go with --table-only (the runs' scoring is --eval-flags')")
    if a.diagnostics_runs and not a.forms:
        p.error("--diagnostics-runs goes with --forms")
    try:
        if a.forms:
            return write_results(a.out, forms_markdown(form_folders(a.forms, p), a.diagnostics_runs, a.scoring),
                                 a.readme)
        if a.table_only:
            suffix = table_suffix(a.runs or subfolders(a.out), a.scoring)
            return write_results(a.out, results_markdown(a.runs or run_folders(a.out, suffix), suffix), a.readme)
        return run_experiment(a, p)
    except (OSError, ValueError) as e:
        raise SystemExit(f"experiment.py: {e}") from None


def run_experiment(a, p) -> str:
    """Every arm x seed in priority order, each trained and evaluated unless it was already; results.md."""
    if not all(0 <= seed < 2**32 for seed in a.seeds) or len(set(a.seeds)) < len(a.seeds):
        p.error(f"--seeds must be distinct and in [0, 2^32), found {' '.join(map(str, a.seeds))}")
    for name in ("arms", "train_sets", "test_sets"):
        values = getattr(a, name)
        if len(set(values)) < len(values):
            p.error(f"--{name.replace('_', '-')} names one twice: {' '.join(values)}")
    flags = passed_flags(a, p)
    suffix = evaluator.results_suffix(evaluator.parse_args(eval_command(a, "none", a.out / "none", flags)))
    check_files(a, p)
    print(f"experiment: {a.out}/", flush=True)
    runs = [("none", None)] if "none" in a.arms else []
    runs += [(arm, seed) for group in GROUPS for seed in a.seeds for arm in group if arm in a.arms]
    for arm, seed in runs:
        if not evaluated(a.out / run_name(arm, seed), suffix):  # evaluated in an earlier call: kept as it is
            train_and_evaluate(a, a.out / run_name(arm, seed), arm, seed, flags, suffix)
    return write_results(a.out, results_markdown(run_folders(a.out, suffix), suffix))


# --------------------------------------------------------------------------------------------
# Checking the input, before anything runs


def given_destinations(parser: argparse.ArgumentParser, args: list[str]) -> set[str]:
    """The destinations that `args` sets under `parser`, abbreviations resolved by the parser itself."""
    unset = object()  # every default: what is not `unset` after parsing was given
    parser.set_defaults(**dict.fromkeys(vars(parser.parse_args([])), unset))
    return {dest for dest, value in vars(parser.parse_args(args)).items() if value is not unset}


def passed_flags(a, p) -> dict[str, list[str]]:
    """The train.py flags of every run, of the Echo runs alone, and the eval.py flags (the experiment's,
    then --train-flags, --echo-flags, --eval-flags), checked by train.py's and eval.py's own parsers
    before anything runs; none may be one the runner gives each run."""
    flags = {}
    for name, parser, fixed, reserved in (("train", train.config_parser(), EXPERIMENT_TRAIN_FLAGS, RUNNER_TRAIN_FLAGS),
                                          ("echo", train.config_parser(), (), RUNNER_TRAIN_FLAGS),
                                          ("eval", evaluator.arg_parser(), EXPERIMENT_EVAL_FLAGS, RUNNER_EVAL_FLAGS)):
        try:
            extra = shlex.split(getattr(a, f"{name}_flags"))
        except ValueError as e:
            p.error(f"--{name}-flags: {e}")
        parser.prog = f"{p.prog} --{name}-flags"  # its errors name the flag they came in
        taken = sorted(given_destinations(parser, extra) & reserved)
        if taken:
            p.error(f"--{name}-flags: {', '.join('--' + t.replace('_', '-') for t in taken)} is given to each run "
                    "by the experiment itself")
        flags[name] = [*fixed, *extra]
    for arm in a.arms:
        if arm != "none":
            train.parse_config(train_command(a, arm, a.seeds[0], a.out / run_name(arm, a.seeds[0]), flags))
    evaluator.parse_args(eval_command(a, "none", a.out / "none", flags))
    return flags


def check_files(a, p):
    """The training and test files the runs read, and the base model, are there."""
    try:
        evaluator.dataset_names(a.test_sets)
    except ValueError as e:
        p.error(f"--test-sets: {e}")
    files = {**{f"{name}/train.json": a.data_dir / name / "train.json" for name in a.train_sets},
             **{f"{name}/test.json": a.data_dir / name / "test.json" for name in a.test_sets}}
    missing = [key for key, path in files.items() if not path.is_file()]
    if missing:
        p.error(f"--data-dir {a.data_dir}: no {', '.join(missing)} (python data/download.py --only "
                + " ".join([*a.test_sets, *(f"{name}-train" for name in a.train_sets)]) + " fetches them)")
    try:
        checkpoints.resolve_checkpoint(a.ckpt)
    except FileNotFoundError as e:
        p.error(f"--ckpt {e}")


# --------------------------------------------------------------------------------------------
# Running: each run as a user types it


def run_name(arm: str, seed: int | None) -> str:
    return arm if seed is None else f"{arm}-s{seed}"


def evaluated(folder: Path, suffix: str = "") -> bool:
    """Whether eval.py has finished in `folder` (`suffix`: its files' for a --scoring)."""
    predictions, _, results = output_files(suffix)
    return (folder / results).is_file() and (folder / predictions).is_file()


def run_script(script: str, args: list[str]) -> int:
    """`python <script> <args>`, as a user runs it, from the current folder; its exit code."""
    print("$ python " + shlex.join([script, *args]), flush=True)
    return subprocess.run([sys.executable, str(ROOT / script), *args]).returncode


def train_command(a, arm: str, seed: int, folder: Path, flags: dict) -> list[str]:
    """train.py's flags for one run: the passed-through ones, then the runner's own."""
    method, arm_flags = ARMS[arm]
    echo = flags["echo"] if method.startswith("echo-") else []
    data = ",".join(str(a.data_dir / name / "train.json") for name in a.train_sets)
    return [*flags["train"], *echo, "--ckpt", a.ckpt, "--method", method, *arm_flags, "--seed", str(seed),
            "--data", data, "--out", str(folder)]


def eval_command(a, arm: str, folder: Path, flags: dict) -> list[str]:
    adapter = [] if arm == "none" else ["--adapter", str(folder)]
    return [*flags["eval"], "--ckpt", a.ckpt, *adapter, "--data-dir", str(a.data_dir), "--datasets", *a.test_sets,
            "--out", str(folder)]


def train_and_evaluate(a, folder: Path, arm: str, seed: int | None, flags: dict, suffix: str):
    """One run: train.py (not for the untouched model), then eval.py, into `folder`; a run cut short
    resumes from its checkpoint, or starts again without one."""
    commands = []
    if arm != "none":
        again = ["--resume"] if (folder / "checkpoint.pt").is_file() else ["--overwrite"] if train.holds_run(folder) else []
        commands.append(("train.py", train_command(a, arm, seed, folder, flags) + again))
    again = ["--overwrite"] if (folder / output_files(suffix)[2]).is_file() else []  # eval.py's own rule
    commands.append(("eval.py", eval_command(a, arm, folder, flags) + again))
    for script, args in commands:
        if code := run_script(script, args):  # it has printed why
            raise ValueError(f"{folder.name}: {script} stopped with exit code {code}; the same command continues the run")


# --------------------------------------------------------------------------------------------
# The table, from the run folders alone


def subfolders(out: Path) -> list[Path]:
    if not out.is_dir():
        raise ValueError(f"{out}: no such folder")
    return sorted(folder for folder in out.iterdir() if folder.is_dir())


def run_folders(out: Path, suffix: str = "") -> list[Path]:
    """The evaluated run folders in `out`."""
    # a folder with eval.py's results.json is a run, even when its predictions are gone: read_run says so
    return [folder for folder in subfolders(out) if (folder / output_files(suffix)[2]).is_file()]


def table_suffix(folders: list[Path], scoring: str | None) -> str:
    """The evaluation files' suffix of --scoring; without it, of the one scoring the folders hold."""
    if scoring is not None:
        return evaluator.results_suffix(evaluator.arg_parser().parse_args(["--scoring", scoring]))
    held = sorted({name for folder in folders for name in EVAL_FILES
                   if name.startswith("results") and name.endswith(".json") and (folder / name).is_file()})
    if len(held) > 1:
        raise ValueError(f"the runs hold results of several scorings ({', '.join(held)}): give --scoring")
    return held[0].removeprefix("results").removesuffix(".json") if held else ""


RESULTS = {"args?": {"scoring?": str, "num_beams?": int, "max_new_tokens?": int, "limit?": int | None, "ckpt?": str,
                     "precision?": str | None},
           "predictions_sha256?": str, "adapter_sha256?": str | None, "test_sha256?": {str: str}}
PREDICTION = {"dataset": Rule(str, lambda v: v in evaluator.BENCHMARKS, "a benchmark: " + ", ".join(evaluator.BENCHMARKS)),
              "index": Rule(int, lambda v: v >= 0, "an index >= 0"), "answer": str, "gold": str, "correct": bool}


def read_predictions(file: Path, data: bytes) -> dict[tuple[str, int], bool]:
    """{(dataset, index): correct} of a predictions.jsonl; `correct` is checked against the answer and
    the gold label, never taken on trust."""
    correct = {}
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        try:
            p = json.loads(line)
        except (ValueError, RecursionError):
            raise ValueError(f"{file}: line {n} is not a prediction (dataset, index, answer, gold, correct)") from None
        check_shape(f"{file}: line {n}", p, PREDICTION)
        key, labels = (p["dataset"], p["index"]), evaluator.BENCHMARKS[p["dataset"]].labels.split("|")
        if p["gold"] not in labels:
            raise ValueError(f"{file}: line {n}: gold {p['gold']!r} is no label of {p['dataset']} ({', '.join(labels)})")
        if p["correct"] != (p["answer"] == p["gold"]):
            raise ValueError(f"{file}: line {n}: 'correct' is {json.dumps(p['correct'])} but the answer is "
                             f"{p['answer']!r} and the gold label {p['gold']!r}")
        if key in correct:
            raise ValueError(f"{file}: line {n}: {key[0]} item {key[1]} is predicted twice")
        correct[key] = p["correct"]
    return correct


def read_run(folder: Path, suffix: str = "") -> dict:
    """An evaluated run: predictions.jsonl (the one source of its accuracies, matching results.json's
    SHA-256), results.json's settings, and train.py's run record for the arm and seed."""
    predictions_name, _, results_name = output_files(suffix)
    summary_file, predictions_file = folder / results_name, folder / predictions_name
    if not predictions_file.is_file():  # a seed fewer, silently, otherwise
        raise ValueError(f"{folder}: {results_name} but no {predictions_name}, the one source of its accuracies")
    summary, data = read_json_shaped(summary_file, RESULTS), read_bytes(predictions_file)
    if summary.get("predictions_sha256", hashlib.sha256(data).hexdigest()) != hashlib.sha256(data).hexdigest():
        raise ValueError(f"{predictions_file}: not the predictions {summary_file} was written with "
                         "(edited since, or an evaluation cut short)")
    record = read_run_record(folder)
    config = record["config"] if record is not None else None
    scored = summary.get("adapter_sha256")
    if scored is not None:  # the adapter in the folder must be the one scored, not one trained since
        adapter = read_json_shaped(folder / "adapter_config.json", {"tensors_sha256": str})
        if adapter["tensors_sha256"] != scored:
            raise ValueError(f"{summary_file}: scored adapter {scored[:12]}, but {folder / 'adapter.safetensors'} is "
                             f"now {adapter['tensors_sha256'][:12]}: evaluate it again (eval.py --overwrite)")
    arm = "none" if config is None else config["method"] + (CONTROL if config.get("echo_inject") == "zero" else "")
    return {"folder": folder, "arm": arm, "seed": config["seed"] if config else None, "record": record,
            "eval": summary.get("args", {}), "tests": summary.get("test_sha256", {}),
            "correct": read_predictions(predictions_file, data)}


def arm_rank(arm: str) -> tuple:
    return (list(ARMS).index(arm), "") if arm in ARMS else (len(ARMS), arm)


def load_runs(folders, suffix: str = "") -> tuple[list[dict], list[str]]:
    """The runs in arm and seed order, checked to be comparable (the same test files and settings, one
    run per arm and seed); and a note for each folder given again (counted once)."""
    runs, first, notes = [], {}, []
    for folder in map(Path, folders):
        real = folder.resolve()
        if real in first:
            notes.append(f"{folder} is {first[real]} given again: counted once")
            continue
        first[real] = folder
        runs.append(read_run(folder, suffix))
    if not runs:
        raise ValueError("no evaluated run (results.json and predictions.jsonl) to tabulate")
    for dataset in evaluator.BENCHMARKS:  # runs are compared question by question: the same test files
        files = {r["tests"][dataset]: r for r in runs if dataset in r["tests"]}
        if len(files) > 1:
            raise ValueError(f"the runs scored different {dataset} test files: " + ", ".join(
                f"{digest[:12]} ({r['folder']})" for digest, r in files.items()))
    differ = [k for k in COMPARED_SETTINGS if len({str(r["eval"].get(k)) for r in runs}) > 1]
    if differ:
        raise ValueError("the runs were evaluated with different settings: " + "; ".join(
            f"--{k.replace('_', '-')} " + ", ".join(f"{r['eval'].get(k)} ({r['folder']})" for r in runs)
            for k in differ))
    by_key = {}
    for run in runs:
        other = by_key.setdefault((run["arm"], run["seed"]), run)
        if other is not run:
            raise ValueError(f"two runs of {run_name(run['arm'], run['seed'])}: {other['folder']} and {run['folder']}")
    return sorted(runs, key=lambda r: (arm_rank(r["arm"]), -1 if r["seed"] is None else r["seed"])), notes


def shared_sets(runs: list[dict]) -> list[str]:
    """The test sets every run was evaluated on, in eval.py's table order."""
    sets = [d for d in evaluator.BENCHMARKS if all(any(q[0] == d for q in r["correct"]) for r in runs)]
    if not sets:
        raise ValueError("the runs share no test set")
    return sets


def accuracy(run: dict, dataset: str) -> float:
    """Percent right of the run's predictions on `dataset`; an unanswered question is wrong."""
    values = [c for (d, _), c in run["correct"].items() if d == dataset]
    return 100 * sum(values) / len(values)


def run_average(run: dict, sets: list[str]) -> float:
    return statistics.mean(accuracy(run, d) for d in sets)


def mean_std(values: list[float]) -> str:
    return f"{values[0]:.1f}" if len(values) == 1 else f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def mcnemar_exact_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar test of gained vs lost flips (each flip a fair coin)."""
    n, k = gained + lost, min(gained, lost)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def pairs(arms: list[str]) -> list[tuple[str, str]]:
    """Each Echo arm against its base and its control, and the control against the base, where run."""
    found = []
    for arm in arms:
        if arm.startswith("echo-") and not arm.endswith(CONTROL):
            base, control = arm.removeprefix("echo-"), arm + CONTROL
            found += [(a, b) for a, b in ((arm, base), (arm, control), (control, base)) if a in arms and b in arms]
    return found


def as_flags(items: dict) -> str:
    return shlex.join(f"--{k.replace('_', '-')}" + ("" if v is True else f"={v:g}" if isinstance(v, float) else f"={v}")
                      for k, v in items.items())


def settings_lines(runs: list[dict], sets: list[str]) -> list[str]:
    """How the runs were made, from their own files: train.py's non-default fields (shared, then each
    arm's own), and eval.py's settings."""
    ckpts = sorted({Path(str(r["eval"].get("ckpt"))).name for r in runs})
    lines = [f"- base model: {', '.join(ckpts)}; runs: {', '.join(r['folder'].name for r in runs)}"]
    trained = [r for r in runs if r["record"]]
    if trained:
        defaults = dataclasses.asdict(train.Config())

        def changed(run):
            return {k: v for k, v in run["record"]["config"].items() if k not in NOT_SETTINGS and defaults.get(k) != v}

        common = {k: v for k, v in changed(trained[0]).items() if all(changed(r).get(k, None) == v for r in trained)}
        data = dict.fromkeys(Path(p).parent.name for r in trained for p in str(r["record"]["config"].get("data", "")).split(","))
        records = sorted({str(r["record"].get("train_records")) for r in trained})
        lines.append(f"- training: train.py on the training splits of {', '.join(data)} ({' / '.join(records)} "
                     f"records), every field at train.py's default except `{as_flags(common)}`")
        for arm in dict.fromkeys(r["arm"] for r in trained):
            own = [{k: v for k, v in changed(r).items() if k not in common} for r in trained if r["arm"] == arm]
            if own[0] or any(o != own[0] for o in own):
                lines.append(f"  - {arm}: `{as_flags(own[0])}`" + ("" if all(o == own[0] for o in own)
                                                                   else " (its runs differ: see their config.json)"))
    e = runs[0]["eval"]
    decoding = evaluator.scoring_description(argparse.Namespace(**{"beam_rule": "?", **e})).removesuffix(".")
    precisions = sorted({str(r["eval"].get("precision")) for r in runs})
    items = f"the first {e['limit']} questions of each" if e.get("limit") else "every question"
    lines.append(f"- evaluation: eval.py, {decoding}; {'/'.join(precisions)} weights; {items} of "
                 f"{', '.join(sets)}")
    return lines


# metrics.jsonl's key, its column in results.md, its digits
DIAGNOSTICS = (("echo_diag_gate", "gate g(e)", 3), ("echo_diag_injection_rel", "injection / ‖A x‖", 2),
               ("echo_diag_ce_plain", "CE(plain)", 3), ("echo_diag_ce_echo", "CE(echo)", 3), ("echo_diag_kl", "KL", 4))
LAST_STEPS = 20  # a diagnostic's end value: the mean of its last 20 steps (one step's is over a few dozen tokens)


def metrics_entries(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in train.metrics_lines(path, math.inf)] if path.is_file() else []


def curve(folder: Path, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the run's metrics.jsonl, at the steps that log it."""
    entries = metrics_entries(folder)
    return [e["step"] for e in entries if key in e], [e[key] for e in entries if key in e]


def diagnostics_lines(runs: list[dict]) -> list[str]:
    """results.md's diagnostics: per Echo run, each at its first step -> the mean of the last LAST_STEPS."""
    rows = []
    for run in runs:
        entries, cells = metrics_entries(run["folder"]), []  # read once for every diagnostic
        for key, _, digits in DIAGNOSTICS:
            values = [e[key] for e in entries if key in e]
            cells.append(f"{values[0]:.{digits}f} -> {statistics.mean(values[-LAST_STEPS:]):.{digits}f}" if values else "-")
        if any(cell != "-" for cell in cells):
            rows.append(f"| {run_name(run['arm'], run['seed'])} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", "## The Echo path's diagnostics", "",
            "On the routed samples' answer tokens, from each Echo run's metrics.jsonl: the value at the first step "
            f"-> the mean of the last {LAST_STEPS} steps. The control injects nothing: it has no gate or injection.", "",
            "| run | " + " | ".join(column for _, column, _ in DIAGNOSTICS) + " |", "|---|" + "---|" * len(DIAGNOSTICS),
            *rows]


GAP_STEPS, WINDOW = 50, 20  # the gap's end: the mean of its last 50 steps; its best: a 20-step mean


def gap_row(name: str, folder: Path) -> str:
    """One run's CE(echo) - CE(plain) per routed answer token (first step, last GAP_STEPS, best WINDOW
    steps) and its gate, injection and KL over the last GAP_STEPS: what shows the deep signal carried."""
    entries = [e for e in metrics_entries(folder) if "echo_diag_ce_echo" in e]
    if not entries:
        return ""
    gaps = [e["echo_diag_ce_echo"] - e["echo_diag_ce_plain"] for e in entries]
    best = min(statistics.mean(gaps[i:i + WINDOW]) for i in range(max(1, len(gaps) - WINDOW + 1)))

    def last(key, digits):
        values = [e[key] for e in entries[-GAP_STEPS:] if key in e]
        return f"{statistics.mean(values):.{digits}f}" if values else "-"
    return (f"| {name} | {gaps[0]:+.4f} | {statistics.mean(gaps[-GAP_STEPS:]):+.4f} | {best:+.4f} | "
            f"{last('echo_diag_kl', 4)} | {last('echo_diag_gate', 3)} | {last('echo_diag_injection_rel', 2)} |")


def form_folders(forms: list[str], p: argparse.ArgumentParser) -> dict[str, Path]:
    named = dict(form.partition("=")[::2] for form in forms)
    if len(named) < len(forms) or not all(name and folder for name, folder in named.items()):
        p.error(f"--forms takes distinct NAME=FOLDER items, found {' '.join(forms)}")
    return {name: Path(folder) for name, folder in named.items()}


def forms_markdown(forms: dict[str, Path], diagnostics_runs: list[Path], scoring: str | None = None) -> str:
    """results.md of experiments side by side: each form's settings, the arms' accuracy in one table,
    each form's pairs, and every Echo run's CE(echo) - CE(plain) with the positive controls'."""
    loaded = {}
    for name, folder in forms.items():
        suffix = table_suffix(subfolders(folder), scoring)
        runs, _ = load_runs(run_folders(folder, suffix), suffix)
        loaded[name] = runs, shared_sets(runs), by_arm(runs)
    lines = ["# Echo vs its base method and its control, in each form", "",
             "Made by `python scripts/experiment.py --table-only --forms` from the run folders' own files; nothing "
             "typed by hand. Each form is one experiment folder (its own results.md gives its settings in full):", ""]
    for name, (runs, sets, _) in loaded.items():
        lines += [f"**{name}** (`{forms[name]}`)", "", *settings_lines(runs, sets), ""]
    arms = sorted({arm for _, _, arms_of in loaded.values() for arm in arms_of}, key=arm_rank)
    header, rule = "| arm |", "|---|"
    for name, (_, sets, _) in loaded.items():
        header += f" {name}: seeds | " + " | ".join(evaluator.BENCHMARKS[d].column for d in sets) + " | Average |"
        rule += "---|" + "---:|" * (len(sets) + 1)
    lines += ["## Accuracy (%), mean ± std over seeds", "", header, rule]
    for arm in arms:
        cells = []
        for _, sets, arms_of in loaded.values():
            by_seed = arms_of.get(arm)
            cells += accuracy_cells(by_seed, sets) if by_seed else ["-"] * (len(sets) + 2)
        lines.append(f"| {'none (untouched)' if arm == 'none' else arm} | " + " | ".join(cells) + " |")
    for name, (_, sets, arms_of) in loaded.items():
        lines += paired_lines(arms_of, sets, f"## Paired, seed by seed: {name}")
    rows = [gap_row(f"{name}: {r['folder'].name}", r["folder"]) for name, (runs, _, _) in loaded.items() for r in runs]
    rows += [gap_row(f"{folder.parent.name}/{folder.name}", folder) for folder in diagnostics_runs]
    lines += ["", "## Did the deep signal carry?", "",
              "CE(echo) - CE(plain) in nats per routed answer token, from each run's metrics.jsonl: at the first "
              f"step, the mean of the last {GAP_STEPS} steps, the best mean of {WINDOW} steps in a row; the KL, "
              f"gate and injection / ‖A x‖ over the last {GAP_STEPS} steps. The control's gap is what the extra "
              "terms give without the deep signal.", "",
              "| run | first step | last 50 | best 20 | KL | gate | injection / ‖A x‖ |",
              "|---|---:|---:|---:|---:|---:|---:|", *[row for row in rows if row]]
    return "\n".join(lines) + "\n"


def results_markdown(folders, suffix: str = "") -> str:
    """results.md: how the runs were made, accuracy per arm, each pair seed by seed with its flips and
    McNemar p, the Echo runs' diagnostics."""
    runs, given_again = load_runs(folders, suffix)
    sets = shared_sets(runs)
    arms = by_arm(runs)
    lines = ["# Echo vs its base method and its control, over seeds", "",
             "Made by `python scripts/experiment.py --table-only` from the run folders' own files (train.py's "
             "config.json, eval.py's results.json and predictions.jsonl); nothing typed by hand.", "",
             *settings_lines(runs, sets),
             *[f"- {arm}: the control, {arm.removesuffix(CONTROL)} with the injection forced to zero "
               "(`--echo-inject zero`): every Echo term without the deep signal" for arm in arms if arm.endswith(CONTROL)],
             "", "## Accuracy (%), mean ± std over seeds", "",
             "| arm | seeds | " + " | ".join(evaluator.BENCHMARKS[d].column for d in sets) + " | Average |",
             "|---|---|" + "---:|" * (len(sets) + 1)]
    for arm, by_seed in arms.items():
        lines.append(f"| {'none (untouched)' if arm == 'none' else arm} | " + " | ".join(accuracy_cells(by_seed, sets)) + " |")
    lines += paired_lines(arms, sets, "## Paired, seed by seed")
    lines += diagnostics_lines(runs)
    if given_again:
        lines += [""] + [f"- {note}" for note in given_again]
    return "\n".join(lines) + "\n"


def by_arm(runs: list[dict]) -> dict[str, dict]:
    arms = {}
    for run in runs:
        arms.setdefault(run["arm"], {})[run["seed"]] = run
    return arms


def accuracy_cells(by_seed: dict, sets: list[str]) -> list[str]:
    """An arm's seeds, then per test set and the average the accuracy (%) mean ± std over them."""
    group = list(by_seed.values())
    seeds = "-" if None in by_seed else ", ".join(str(s) for s in by_seed)
    return [seeds] + [mean_std([accuracy(r, d) for r in group]) for d in sets] + [mean_std([run_average(r, sets) for r in group])]


def paired_lines(arms: dict[str, dict], sets: list[str], heading: str) -> list[str]:
    """Each pair of arms seed by seed (and pooled): accuracies, the flips each way, exact McNemar p."""
    lines = []
    found = pairs(list(arms))
    if found:
        lines += ["", heading, "",
                  "The same seed, the same questions: the average accuracy (%) of each arm, their difference, the "
                  "questions right with one arm only, and the two-sided exact McNemar test of those flips. The pooled "
                  "row counts a question once per seed, as if the seeds' flips were independent.", "",
                  "| A vs B | seed | A | B | A - B | right with A only | right with B only | McNemar p |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        notes = []
        for first, second in found:
            seeds = [s for s in arms[first] if s in arms[second]]
            if not seeds:
                continue
            rows = []
            for seed in seeds:
                a, b = arms[first][seed], arms[second][seed]
                questions = [q for q in a["correct"] if q in b["correct"] and q[0] in sets]
                unpaired = len({q for q in a["correct"].keys() ^ b["correct"].keys() if q[0] in sets})
                if unpaired:
                    notes.append(f"- {first} vs {second}, seed {seed}: {unpaired} questions not in both runs are "
                                 "left out of the flips")
                rows.append((run_average(a, sets), run_average(b, sets),
                             sum(a["correct"][q] and not b["correct"][q] for q in questions),
                             sum(b["correct"][q] and not a["correct"][q] for q in questions)))
            for seed, (acc_a, acc_b, gained, lost) in zip(seeds, rows):
                lines.append(f"| {first} vs {second} | {seed} | {acc_a:.1f} | {acc_b:.1f} | {acc_a - acc_b:+.1f} | "
                             f"{gained} | {lost} | {mcnemar_exact_p(gained, lost):.3g} |")
            if len(rows) > 1:
                gained, lost = sum(r[2] for r in rows), sum(r[3] for r in rows)
                diffs = [r[0] - r[1] for r in rows]
                lines.append(f"| {first} vs {second} | pooled ({len(rows)}) | {mean_std([r[0] for r in rows])} | "
                             f"{mean_std([r[1] for r in rows])} | {statistics.mean(diffs):+.1f} ± "
                             f"{statistics.stdev(diffs):.1f} | {gained} | {lost} | {mcnemar_exact_p(gained, lost):.3g} |")
        if notes:
            lines += [""] + notes
    return lines


def results_block(text: str) -> str:
    """results.md's accuracy table as a README shows it (its heading in bold): its first section."""
    section = text[text.index("\n## ") + 1:]
    return re.sub(r"^## (.+)$", r"**\1**", section[:section.find("\n## ") + 1] if "\n## " in section else section,
                  flags=re.M)


def with_results_block(readme: Path, text: str) -> str:
    """The README's text with results_block(text) between its README_BEGIN and README_END lines."""
    head, begin, rest = read_bytes(readme).decode("utf-8").partition(README_BEGIN)
    _, end, tail = rest.partition(README_END)
    if not (begin and end) or README_BEGIN in rest or README_END in tail:
        raise ValueError(f"{readme}: needs one {README_BEGIN} line and one {README_END} line after it")
    return head + README_BEGIN + "\n" + results_block(text) + README_END + tail


def write_results(out: Path, text: str, readme: Path | None = None) -> str:
    """`text` as <out>/results.md (and its accuracy table into `readme`); printed, and returned."""
    shown = readme and with_results_block(readme, text)
    write_atomically(out / "results.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    if readme:
        write_atomically(readme, lambda tmp: tmp.write_text(shown, encoding="utf-8"))
    print(text)
    return text


if __name__ == "__main__":
    main()
