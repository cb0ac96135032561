"""The experiments' figure, from their run folders' own files: one row per experiment folder.

    python scripts/figure.py results/smollm2-cpu/experiment results/smollm2-cpu/whole-text \
        --names answer-only whole-text --out results/smollm2-cpu/figure.png

Each row: accuracy per arm (mean over the shared test sets), each seed a point, mean ± std a bar;
then the Echo runs' CE(echo) - CE(plain) and gate g(e) per step from metrics.jsonl, faint per
step, a running mean over SMOOTHING steps on top. matplotlib is imported here only
(requirements-dev.txt).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent))  # experiment.py beside this file

import experiment  # noqa: E402

CURVES = ((("echo_diag_ce_echo", "echo_diag_ce_plain"), "CE(echo) - CE(plain), routed answer tokens"),
          ("echo_diag_gate", "gate g(e), mean"))
SMOOTHING = 20  # steps in the running mean: one step's CE is over a few dozen answer tokens, too noisy to read


def difference(folder: Path, minuend: str, subtrahend: str) -> tuple[list[int], list[float]]:
    """(steps, minuend - subtrahend) at the steps that log both."""
    first, second = (dict(zip(*experiment.curve(folder, key))) for key in (minuend, subtrahend))
    steps = [step for step in first if step in second]
    return steps, [first[step] - second[step] for step in steps]


def running_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the window - 1 before it (fewer at the start)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def draw(experiments: dict[str, tuple[list[Path], str]], file: Path):
    """`experiments`: a row's name -> (its run folders, their evaluation files' suffix)."""
    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(experiments), 1 + len(CURVES), figsize=(5 + 5 * len(CURVES), 4.2 * len(experiments)),
                             squeeze=False)
    for row, (name, (folders, suffix)) in zip(axes, experiments.items()):
        runs, _ = experiment.load_runs(folders, suffix)
        draw_row(plt, row, name, runs)
    for ax in axes[1:, 0]:  # the forms' accuracies on one scale
        ax.sharey(axes[0, 0])
    fig.tight_layout()
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file, dpi=90)
    plt.close(fig)


def draw_row(plt, axes, name: str, runs: list[dict]):
    sets = experiment.shared_sets(runs)
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    colors = {arm: plt.get_cmap("tab10")(i) for i, arm in enumerate(experiment.ARMS)} | {
        arm: "gray" for arm in arms if arm not in experiment.ARMS}
    ax = axes[0]
    for x, arm in enumerate(arms):
        values = [experiment.run_average(r, sets) for r in runs if r["arm"] == arm]
        offsets = [0.08 * (i - (len(values) - 1) / 2) for i in range(len(values))]
        ax.scatter([x - 0.12 + o for o in offsets], values, s=18, color=colors[arm], zorder=3)
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
        ax.errorbar([x + 0.15], [mean], yerr=[std], fmt="D", color=colors[arm], capsize=4, markersize=5)
    ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
    ax.set_ylabel(f"accuracy (%), mean of {', '.join(sets)}")
    ax.set_title(f"{name}: each seed, and mean ± std")
    ax.grid(axis="y", alpha=0.3)

    echo_runs = [r for r in runs if r["arm"].startswith("echo-")]
    for ax, (key, title) in zip(axes[1:], CURVES):
        labelled = set()
        for run in echo_runs:
            steps, values = difference(run["folder"], *key) if isinstance(key, tuple) else experiment.curve(run["folder"], key)
            if steps:
                ax.plot(steps, values, color=colors[run["arm"]], alpha=0.2, linewidth=0.7,
                        marker="." if len(steps) < 30 else None)
                ax.plot(steps, running_mean(values, SMOOTHING), color=colors[run["arm"]], linewidth=1.5,
                        label=None if run["arm"] in labelled else run["arm"])
                labelled.add(run["arm"])
        if isinstance(key, tuple):
            ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{name}: {title}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if labelled:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no Echo run logged it", ha="center", va="center", transform=ax.transAxes)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("dirs", type=Path, nargs="+", metavar="DIR",
                   help="experiment folders holding run folders, one row each (required)")
    p.add_argument("--out", type=Path, help="the PNG written (default: the first DIR's figure.png)")
    p.add_argument("--names", nargs="+", help="the rows' names, one per DIR (default: the folders' names)")
    p.add_argument("--scoring", help="which evaluation's files to read, a value of eval.py --scoring (default: the "
                                     "one scoring the runs hold results of)")
    a = p.parse_args(argv)
    out = a.out or a.dirs[0] / "figure.png"
    names = a.names or [folder.name for folder in a.dirs]
    if len(names) != len(a.dirs) or len(set(names)) < len(names):
        p.error(f"--names needs one distinct name per DIR ({len(a.dirs)}), found {' '.join(names)}")
    try:
        experiments = {}
        for name, folder in zip(names, a.dirs):
            suffix = experiment.table_suffix(experiment.subfolders(folder), a.scoring)
            experiments[name] = experiment.run_folders(folder, suffix), suffix
        draw(experiments, out)
    except (OSError, ValueError) as e:
        raise SystemExit(f"figure.py: {e}") from None
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
