"""The run folder train.py writes, with its rules: what is in it, when it may be written into,
continued or replaced, and its resumable checkpoint.

    out/<method>-<ckpt>/  config.json (train.py's record: RUN_MARKER, every flag, the versions, the git commit)
                          metrics.jsonl, checkpoint.pt, adapter.safetensors, adapter_config.json
                          and eval.py's results*, predictions* (data.files.EVAL_FILES)

A folder holding a run is continued (--resume) or replaced (--overwrite), never silently
written over; a second train.py into the same folder is refused while the first holds it.
"""

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy
import torch
from tqdm import tqdm

from data.adapters import adapter_state, copy_adapter_tensors, save_adapter
from data.files import (EVAL_FILES, RUN_MARKER, Rule, check_shape, code_version, locked_folder, output_folder, read_bytes,
                        read_run_record, recorded_command, recorded_path, refuse_constant, write_atomically)
from echo_lora import trainable_parameters


# The files train.py writes in a run folder: it refuses to write over them unless asked, and
# --overwrite removes exactly these and eval.py's (EVAL_FILES), by name. What makes the folder a
# run is its config.json with train.py's RUN_MARKER (data.files.read_run_record).
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "adapter.safetensors", "adapter_config.json")


# Flags a resumed run may change, because they cannot change what it computes (--out: the run
# folder was moved; a larger --max-steps is checked apart: it continues the run further).
RESUME_MAY_CHANGE = {"out", "resume", "overwrite", "log_every", "save_every", "gradient_checkpointing", "max_steps"}


def holds_run(folder: Path) -> bool:
    """Whether `folder` holds a run: train.py's record (config.json with RUN_MARKER) is there."""
    try:
        return read_run_record(folder) is not None
    except ValueError:  # unreadable: no run to continue or replace (check_out_folder says why)
        return False


def taken(folder: Path) -> list[str]:
    """The names of the files train.py would write that `folder` holds already."""
    return [name for name in RUN_FILES if (folder / name).exists()]


def default_out(base: str, resume: bool) -> str:
    """`--out` not given: `base`, or when files a run writes are already there (and this is no
    --resume) the first free `base`-2, -3, ...: running the same command twice never overwrites a run."""
    if resume or not taken(Path(base)):
        return base
    n = 2
    while taken(Path(f"{base}-{n}")):
        n += 1
    return f"{base}-{n}"


@contextlib.contextmanager
def run_folder(cfg, rank: int):
    """--out for the run's life: checked before anything is loaded, and (rank 0's, which alone
    writes there) held by this process alone, so a second train.py into it fails at once."""
    out = Path(cfg.out)
    with contextlib.ExitStack() as held:
        try:
            output_folder(out)
            if rank == 0:
                held.enter_context(locked_folder(out))
            check_out_folder(cfg)
        except OSError as e:  # made and locked before the model loads: a read-only or full disk
            raise ValueError(f"--out {out}: cannot write a run there: {e.strerror or e}") from None
        yield out


def check_out_folder(cfg):
    """A folder holding a run is continued (--resume) or replaced (--overwrite), never silently
    written over; a resumed run must not change what the run computes, and needs the run's record
    to tell. A folder holding files of train.py's names but no run record (an HF model folder's
    config.json, a run whose config.json is gone) is never written into."""
    out = Path(cfg.out)
    record, names = read_run_record(out), taken(out)
    if record is None and names:
        raise ValueError(f"{out}: holds {', '.join(names)} but no train.py run record (a config.json with "
                         f"{RUN_MARKER!r}): not a run to " + ("resume" if cfg.resume else "replace")
                         + "; give another --out")
    if record is None and cfg.resume:
        raise ValueError(f"{out}: --resume given but there is no run there to resume")
    if record is None or cfg.overwrite:
        return
    if not cfg.resume:
        raise ValueError(f"{out}: holds a run already; --resume continues it, --overwrite replaces it, "
                         "or give another --out")
    saved = record.get("config", {})
    now = dataclasses.asdict(cfg)
    changed = [k for k in now if k in saved and saved[k] != now[k] and k not in RESUME_MAY_CHANGE]
    if "max_steps" in saved and (now["max_steps"] or math.inf) < (saved["max_steps"] or math.inf):  # 0: all epochs
        changed.append("max_steps")  # only a longer run continues this one
    if changed:
        raise ValueError(f"{out}: --resume with flags that change the run: "
                         + ", ".join(f"--{k.replace('_', '-')} {saved[k]} -> {now[k]}" for k in changed)
                         + "; start a new run (another --out) instead")


def prepare_run_folder(cfg, out: Path, step: int, record: dict):
    """--overwrite's old run removed (and eval.py's results of its adapter), config.json written,
    metrics.jsonl started or, on --resume, cut back to the checkpoint's step."""
    if cfg.overwrite:  # exactly the files train.py and eval.py write: the user's own stay
        for name in RUN_FILES + EVAL_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "config.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2)))
    metrics_file = out / "metrics.jsonl"
    kept = metrics_lines(metrics_file, step) if cfg.resume and metrics_file.exists() else []
    write_atomically(metrics_file, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


# A metrics.jsonl line's shape (data.files.check_shape): its step, then numbers.
METRICS_ENTRY = {"step": Rule(int, lambda v: v >= 0, "a step >= 0"), str: float | None}


def metrics_lines(path: Path, up_to_step: float) -> list[str]:
    """The lines of metrics.jsonl up to `up_to_step`. A partial last line (the run was killed
    during its append) is dropped; a malformed line before it, or an entry of the wrong shape,
    is a ValueError naming the file and line."""
    try:
        lines = read_bytes(path).decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    kept = []
    for n, line in enumerate(lines, 1):
        try:
            entry = json.loads(line, parse_constant=refuse_constant)
        except (ValueError, RecursionError):
            if n == len(lines):
                break
            raise ValueError(f"{path}: line {n} is not a metrics entry") from None
        if check_shape(f"{path}: line {n}", entry, METRICS_ENTRY)["step"] <= up_to_step:
            kept.append(line)
    return kept


def append_metrics(out: Path, entry: dict):
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")


def run_record(cfg, args, n_train: int, n_echo_params: int) -> dict:
    import safetensors
    import sentencepiece
    import tiktoken

    # the folder and the command relative to the repository: a committed run names no machine's folders
    return {RUN_MARKER: 1, "config": dataclasses.asdict(cfg) | {"out": recorded_path(cfg.out)}, "model_args": dataclasses.asdict(args), "train_records": n_train,
            "echo_parameters": n_echo_params, "command": recorded_command(sys.argv), "code": code_version(),
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__,
                         "sentencepiece": sentencepiece.__version__, "tiktoken": tiktoken.__version__,
                         "safetensors": safetensors.__version__}}


def save_checkpoint(path: Path, step: int, model, echo, optimizer, best_val: float):
    state = {"step": step, "adapter": adapter_state(model), "base_fingerprint": getattr(model, "fingerprint", None),
             "echo": echo.state_dict() if echo else None, "optimizer": optimizer.state_dict(),
             "best_val": best_val, "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def restore_checkpoint(path: Path, model, echo, optimizer) -> tuple[int, float]:
    if not path.is_file():
        raise ValueError(f"{path}: --resume given but there is no checkpoint to resume from")
    try:  # tensors and plain values only: a pickle that would run code is refused, never run
        state = torch.load(path, weights_only=True)
        copy_adapter_tensors(model, state["adapter"], path)
    except Exception as e:  # pickle, torch and format errors alike; the user needs the file name
        raise ValueError(f"{path}: not a checkpoint this run can resume from: {str(e).splitlines()[0]}") from None
    saved, mine = state.get("base_fingerprint"), getattr(model, "fingerprint", None)
    if None not in (saved, mine) and saved != mine:  # the same shapes, other weights: another run, not this one
        raise ValueError(f"{path}: the run trained on other base weights (fingerprint {saved}, the --ckpt loaded has "
                         f"{mine}): --resume continues only the same run; start a new one (another --out)")
    if echo:
        echo.load_state_dict(state["echo"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["best_val"]


def save_run(cfg, out: Path, step: int, total_steps: int, keep_last: bool, model, echo, optimizer, params,
             best_val: float):
    """After a step: the adapter, when the last one is the one kept (no validation records) and
    this is the last step; a resumable checkpoint every --save-every steps and at the end. Nothing
    non-finite is saved. `params`: what the optimizer updates."""
    last = step == total_steps
    if keep_last and last or step % cfg.save_every == 0:
        flat = torch.cat([p.detach().flatten() for p in params])
        stop_if_not_finite(step, out, cfg, largest_parameter=flat.abs().max().item())  # NaN propagates through max
    if keep_last and last:
        save_adapter(out, model, {"method": cfg.method, "ckpt": cfg.ckpt, "step": step})
    if step % cfg.save_every == 0 or last:
        save_checkpoint(out / "checkpoint.pt", step, model, echo, optimizer, best_val)


def run_summary(cfg, model, echo, n_train: int, total_steps: int, device) -> str:
    """The line train.py prints as a run starts."""
    n_adapter = sum(p.numel() for p in trainable_parameters(model))
    return (f"{cfg.method}: {n_adapter:,} adapter parameters"
            + (f" + {echo.n_parameters():,} echo parameters (training only)" if echo else "")
            + f"; {n_train} training records, {total_steps} steps, lr {cfg.lr:g}, on {device}")


def stop_if_not_finite(step: int, out: Path, cfg, **values: float):
    """NaN or inf stops training at once, with one line naming the step (a ValueError: train.main's one line). Checked before each
    update and each save, so nothing non-finite is saved: the adapter in `out` stays the last
    finite one."""
    if all(math.isfinite(v) for v in values.values()):
        return
    raise ValueError(f"step {step}: " + ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in values.items())
                     + f": not finite, training stopped (--lr {cfg.lr:g} too high?); {out} keeps the last finite adapter")


class Progress:
    """The progress bar (rank 0's): loss, lr and real tokens/s over the last --log-every steps."""

    def __init__(self, cfg, step: int, total_steps: int, rank: int, world: int):
        self.bar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
        self.log_every, self.world = cfg.log_every, world
        self.tokens, self.t_last = 0, time.perf_counter()

    def step(self, step: int, tokens: int, losses: torch.Tensor, lr: float, grad_norm: float, routed) -> dict:
        """Advance by one step of this process's `tokens`; the step's metrics.jsonl entry."""
        self.bar.update(1)
        self.tokens += tokens
        ce, echo_loss = losses.tolist()
        entry = {"step": step, "loss": ce + echo_loss, "ce": ce, "echo": echo_loss,
                 "lr": lr, "grad_norm": grad_norm, "routed": int(routed.sum())}
        if step % self.log_every == 0:
            entry["tokens_per_s"] = self.tokens * self.world / (time.perf_counter() - self.t_last)
            self.tokens, self.t_last = 0, time.perf_counter()
            self.bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}")
        return entry
