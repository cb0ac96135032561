"""The experiment's figure, from its run folders' own files: DIR/figure.png.

    python scripts/figure.py results/smollm2-cpu/experiment

Left: accuracy per arm (mean over the shared test sets), each seed a point, mean ± std a bar.
Right: the Echo runs' diagnostics per step from metrics.jsonl: CE(plain), CE(echo), their
difference and the gate g(e), faint per step, a running mean over SMOOTHING steps on top.
matplotlib is imported here only (requirements-dev.txt).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent))  # experiment.py beside this file

import experiment  # noqa: E402

CURVES = (("echo_diag_ce_plain", "CE(plain), routed answer tokens"), ("echo_diag_ce_echo", "CE(echo), the same tokens"),
          (("echo_diag_ce_echo", "echo_diag_ce_plain"), "CE(echo) - CE(plain)"), ("echo_diag_gate", "gate g(e), mean"))
SMOOTHING = 20  # steps in the running mean: one step's CE is over a few dozen answer tokens, too noisy to read


def difference(folder: Path, minuend: str, subtrahend: str) -> tuple[list[int], list[float]]:
    """(steps, minuend - subtrahend) at the steps that log both."""
    first, second = (dict(zip(*experiment.curve(folder, key))) for key in (minuend, subtrahend))
    steps = [step for step in first if step in second]
    return steps, [first[step] - second[step] for step in steps]


def running_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the window - 1 before it (fewer at the start)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def draw(folders, file: Path, suffix: str = ""):
    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt

    runs, _ = experiment.load_runs(folders, suffix)
    sets = experiment.shared_sets(runs)
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    colors = {arm: plt.get_cmap("tab10")(i) for i, arm in enumerate(arms)}
    fig, axes = plt.subplots(1, 1 + len(CURVES), figsize=(5 + 4 * len(CURVES), 4.2))

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
    ax.set_title("per arm: each seed, and mean ± std")
    ax.grid(axis="y", alpha=0.3)

    axes[2].sharey(axes[1])  # CE(echo) below CE(plain) is the deep signal helping: one scale for both
    echo_runs = [r for r in runs if r["arm"].startswith("echo-")]
    for ax, (key, title) in zip(axes[1:], CURVES):
        labelled = set()
        for run in echo_runs:
            steps, values = difference(run["folder"], *key) if isinstance(key, tuple) else experiment.curve(run["folder"], key)
            if steps:
                ax.plot(steps, values, color=colors[run["arm"]], alpha=0.25, linewidth=0.7,
                        marker="." if len(steps) < 30 else None)
                ax.plot(steps, running_mean(values, SMOOTHING), color=colors[run["arm"]], linewidth=1.5,
                        label=None if run["arm"] in labelled else run["arm"])
                labelled.add(run["arm"])
        if isinstance(key, tuple):
            ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if labelled:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no Echo run logged it", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file, dpi=120)
    plt.close(fig)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("dir", type=Path, help="the experiment's folder, holding the run folders (required)")
    p.add_argument("--out", type=Path, help="the PNG written (default: DIR/figure.png)")
    p.add_argument("--scoring", help="which evaluation's files to read, a value of eval.py --scoring (default: the "
                                     "one scoring the runs hold results of)")
    a = p.parse_args(argv)
    out = a.out or a.dir / "figure.png"
    try:
        suffix = experiment.table_suffix(experiment.subfolders(a.dir), a.scoring)
        draw(experiment.run_folders(a.dir, suffix), out, suffix)
    except (OSError, ValueError) as e:
        raise SystemExit(f"figure.py: {e}") from None
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
