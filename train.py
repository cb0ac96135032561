"""Fine-tune LLaMA with LoRA, DoRA, Echo-LoRA or Echo-DoRA on commonsense_170k.

    python train.py                                   # the embedded default: a tiny model, a minute on a CPU
    python train.py --ckpt llama-7b --method echo-lora
    torchrun --nproc_per_node 8 train.py --ckpt llama-7b --method echo-dora

Reads top to bottom: configuration, model, training machinery, the run folder, then `run`: the
loop (the data and its batches: data/batches.py). The defaults are the commonsense recipe of
LLM-Adapters and DoRA (docs/recipe.md); every departure is an opt-in flag. A run writes, beside
its adapter, config.json (every flag, library versions, the model's params) and metrics.jsonl.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
import torch.distributed as dist
from tqdm import tqdm

import llama
from data import checkpoints
from data.adapters import copy_adapter_tensors
from data.batches import Batch, TrainingData, collate, encode_examples, micro_batch_slices, padded_parts, read_records
from data.commonsense import IGNORE_INDEX, load_records, train_prompt
from data.files import (EVAL_FILES, RUN_MARKER, Rule, check_shape, code_version, locked_folder, output_folder, read_bytes,
                        read_run_record, recorded_command, recorded_path, refuse_constant, write_atomically)
from data.flags import (BLOCK_NUMBERS, NAMES, NOT_NEGATIVE, POSITIVE, SEED, check_allowed, dataclass_parser, flag,
                        given_flags, list_items)
from data.published import default_lr
from echo_lora import (DEFAULT_TARGETS, ECHO_CHOICES, EchoConfig, EchoPath, add_adapters, adapter_parameters,
                       adapter_state, loss_terms, route, save_adapter, trainable_parameters)

EMBEDDED = "tiny"  # the checkpoint `python train.py` builds and uses when given nothing
SAMPLE = Path(__file__).resolve().parent / "data" / "sample"  # our own small records (data/README.md)
METHODS = ("lora", "dora", "echo-lora", "echo-dora")
ECHO_DEFAULTS = EchoConfig()  # the Echo path's defaults live in echo_lora.EchoConfig alone


def echo_flag(name: str, help: str, **kw):
    """A flag of the Echo path: its default and choices are EchoConfig's."""
    default = getattr(ECHO_DEFAULTS, name)
    if isinstance(default, tuple) or default is None:  # block numbers, as a comma-separated flag
        return flag(",".join(map(str, default or ())), help, **kw)
    return flag(default, help, choices=ECHO_CHOICES.get(name), **kw)


def echo_flag_name(name: str) -> str:
    """pool -> echo_pool, echo_pass -> echo_pass."""
    return name if name.startswith("echo_") else "echo_" + name


@dataclass
class Config:
    ckpt: str = flag(EMBEDDED, "checkpoints/NAME or a Meta-layout LLaMA folder (HF: scripts/convert_hf.py "
                               "first); tiny is built on first use")
    method: str = flag("echo-lora", "lora and dora: the baselines; echo-: the same adapter trained with the Echo path",
                       choices=METHODS)
    data: str = flag("data/commonsense_170k.json", "one or more commonsense JSON files, comma-separated", items=NAMES)
    out: str = flag("", "the run's folder: adapter, config.json, metrics.jsonl, checkpoint.pt",
                    default_text="out/<method>-<ckpt name>, or the first free -2, -3, ... beside it")
    # adapters (the recipe)
    r: int = flag(32, "adapter rank", allowed=POSITIVE)
    alpha: float = flag(64, "adapter scale: the update is alpha / r x B A",
                        allowed=(lambda v: 0 < v < math.inf, "> 0 and finite"))
    dropout: float = flag(0.05, "dropout on the adapters' input", allowed=(lambda v: 0 <= v < 1, "in [0, 1)"))
    targets: str = flag(",".join(DEFAULT_TARGETS), "adapted linears of every block: wq, wk, wv, wo, w1 (gate), "
                        "w3 (up), w2 (down)", items=NAMES)
    # optimisation (the recipe)
    lr: float = flag(0.0, "peak learning rate",
                     allowed=(lambda v: 0 <= v < math.inf, ">= 0 and finite (0: the recipe's rate)"),
                     default_text="by method and model: 3e-4 for LoRA; DoRA 1e-4 on LLaMA-7B and Llama-3-8B, else 2e-4")
    batch_size: int = flag(16, "records per optimizer step, over all processes", allowed=POSITIVE)
    micro_batch_size: int = flag(16, "records per forward pass and process (accumulated)", allowed=POSITIVE)
    epochs: int = flag(3, "passes over the training records", allowed=POSITIVE)
    cutoff: int = flag(256, "tokens kept of each record", allowed=(lambda v: v >= 2, ">= 2 (BOS and one more)"))
    warmup_steps: int = flag(100, "steps of linear warm-up, then linear decay to 0", allowed=NOT_NEGATIVE)
    grad_clip: float = flag(1.0, "largest gradient norm", allowed=(lambda v: v > 0, "> 0 (inf: no clipping)"),
                            infinite=True)
    # departures from the recipe, all off by default (docs/recipe.md)
    answer_only_loss: bool = flag(False, "departure: the plain cross-entropy on answer tokens only")
    token_mean_loss: bool = flag(False, "departure: one mean over the step's tokens, not a mean of micro-batch means")
    group_by_length: bool = flag(False, "departure (speed): batches of similar lengths, less padding, less random")
    adapter_only_dropout: bool = flag(False, "departure (speed, DoRA): dropout on the adapter path only")
    cloze: bool = flag(False, "departure (small models): train on 'Question: q / Answer: <the correct choice's "
                       "text>'; evaluate with eval.py --scoring cloze")
    val_size: int = flag(120, "validation records held out (0: none, the last adapter is kept)", allowed=NOT_NEGATIVE)
    val_seed: int = flag(42, "seed of the validation split (every run validates on the same records)", allowed=SEED)
    eval_every: int = flag(80, "steps between validation losses; the best adapter is kept", allowed=POSITIVE)
    save_every: int = flag(200, "steps between resumable checkpoints", allowed=POSITIVE)
    max_steps: int = flag(0, "stop after this many steps (the schedule spans them)",
                          allowed=(lambda v: v >= 0, ">= 0 (0: all epochs)"))
    seed: int = flag(42, "seed of the adapters' initialisation, the batch order, dropout and routing", allowed=SEED)
    # the Echo path (METHOD.md items 1-7; defaults and choices from EchoConfig); block numbers 1-based, comma-separated
    echo_source_layers: str = echo_flag("source_layers", "blocks whose states make the echo representation (item 1)",
                                        default_text="the deepest quarter of blocks", items=BLOCK_NUMBERS)
    echo_target_layers: str = echo_flag("target_layers", "blocks whose adapters take the injection (item 3)",
                                        default_text="the shallowest quarter of blocks", items=BLOCK_NUMBERS)
    echo_pool: str = echo_flag("pool", "the echo representation: mean over the prompt, or its last position (item 2)")
    echo_route_p: float = echo_flag("route_p", "stochastic routing: each sample's chance of the echo pass (item 5)",
                                    allowed=(lambda v: 0 <= v <= 1, "in [0, 1]"))
    echo_distill: float = echo_flag("distill", "lambda, the masked distillation weight (item 7)", allowed=NOT_NEGATIVE)
    echo_tau: float = echo_flag("tau", "tau, the masked distillation temperature (item 7)",
                                allowed=(lambda v: v > 0, "> 0"))
    echo_mask: str = echo_flag("mask", "answer-only masks; none leaks the answer (needs --echo-pass full) (item 4)")
    echo_pass: str = echo_flag("echo_pass", "suffix: only the answer suffix; full: every position (item 6)")
    echo_inject: str = echo_flag("inject", "echo: inject the deep signal; zero: the control, without it (item 4)")
    echo_up: str = echo_flag("up", "the injected term goes through the adapter's B (lora), or its own U (item 4)")
    echo_lr_scale: float = echo_flag("lr_scale", "the Echo path's parameters train at this multiple of --lr (item 4)",
                                     allowed=(lambda v: v > 0, "> 0"))
    # machinery
    gradient_checkpointing: bool = flag(False, "recompute each block's activations in the backward pass: less memory")
    resume: bool = flag(False, "continue the run in --out from its checkpoint.pt")
    overwrite: bool = flag(False, "replace the run already in --out; without it a run there is refused")
    device: str = flag("", "cpu, cuda or cuda:N", default_text="cuda when available")
    precision: str = flag("", "bf16: the recipe's autocast; fp32: everything in fp32", choices=tuple(checkpoints.PRECISIONS),
                          default_text="bf16 on cuda, fp32 elsewhere")
    log_every: int = flag(1, "steps between tokens/s readings (progress line and metrics.jsonl)", allowed=POSITIVE)


# Per-checkpoint defaults of unset flags: the embedded tiny model's one-minute CPU demo on our
# sample (a higher lr: its base model is random, the adapters carry everything).
PRESETS = {
    EMBEDDED: dict(data=str(SAMPLE / "train.json"), val_size=40, warmup_steps=10, eval_every=20, save_every=50,
                   epochs=2, lr=2e-3),
}


def embedded_name(ckpt: str) -> str | None:
    """EMBEDDED when --ckpt is the embedded model (its name or its folder; another folder named tiny is not)."""
    built = Path("checkpoints") / EMBEDDED
    return EMBEDDED if ckpt == EMBEDDED or Path(ckpt).resolve() == built.resolve() else None


def config_parser() -> argparse.ArgumentParser:
    return dataclass_parser(Config, PRESETS, __doc__.split("\n")[0])


def parse_config(argv=None) -> Config:
    """The run's Config: the flags given, else the checkpoint's PRESETS, else Config's defaults."""
    parser = config_parser()
    given = given_flags(parser, argv)
    cfg = Config(**{**PRESETS.get(embedded_name(given.get("ckpt", EMBEDDED)), {}), **given})
    check_allowed(parser, cfg)
    echo_flags = ["--" + k.replace("_", "-") for k in given if k.startswith("echo_")]
    if echo_flags and not cfg.method.startswith("echo-"):
        parser.error(f"{', '.join(echo_flags)} given with --method {cfg.method}, which has no Echo path")
    if cfg.echo_mask == "none" and cfg.echo_pass == "suffix":  # injecting in the prompt leaves no shared prefix
        parser.error("--echo-mask none injects at every position: it needs --echo-pass full")
    if cfg.resume and cfg.overwrite:
        parser.error("--resume continues the run in --out, --overwrite replaces it: give one")
    try:
        _, cfg.precision = checkpoints.device_and_precision(cfg.device, cfg.precision)
    except ValueError as e:
        parser.error(str(e))
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's processes
    if cfg.batch_size % (world * cfg.micro_batch_size):
        parser.error(f"--batch-size {cfg.batch_size} is not a multiple of {f'{world} processes x ' if world > 1 else ''}"
                     f"--micro-batch-size {cfg.micro_batch_size}")
    cfg.lr = cfg.lr or default_lr(cfg.method, cfg.ckpt)
    cfg.out = cfg.out or default_out(f"out/{cfg.method}-{Path(cfg.ckpt).name}", cfg.resume)
    return cfg


def echo_config(cfg: Config) -> EchoConfig | None:
    """The Echo path's EchoConfig from its --echo-* flags (None for lora and dora)."""
    if not cfg.method.startswith("echo-"):
        return None
    layers = lambda s: tuple(list_items("", s, BLOCK_NUMBERS)) if s else None  # noqa: E731  (checked when parsed)
    values = {f.name: getattr(cfg, echo_flag_name(f.name)) for f in dataclasses.fields(EchoConfig)}
    return EchoConfig(**{k: layers(v) if k.endswith("_layers") else v for k, v in values.items()})


# --------------------------------------------------------------------------------------------
# Device and model


def start_device(cfg: Config) -> tuple[torch.device, bool]:
    """(device, whether distributed): under torchrun the process group is joined even by one process,
    so one GPU runs the multi-GPU code path."""
    device = checkpoints.resolve_device(cfg.device)
    distributed = "LOCAL_RANK" in os.environ
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, distributed


def load_model(cfg: Config, device, rank: int, world: int):
    """The base model and its tokenizer (the embedded tiny model is built first if missing)."""
    if cfg.ckpt == EMBEDDED and not (Path("checkpoints") / EMBEDDED / "params.json").is_file():
        if rank == 0:
            print(f"no checkpoint given: building the embedded tiny model in checkpoints/{EMBEDDED}/")
            build_embedded_checkpoint(Path("checkpoints") / EMBEDDED, Path(PRESETS[EMBEDDED]["data"]))
        if world > 1:
            dist.barrier()
    model, tokenizer = llama.load(checkpoints.resolve_checkpoint(cfg.ckpt), device=device,
                                  dtype=checkpoints.PRECISIONS[cfg.precision])
    if tokenizer is None:
        raise FileNotFoundError(f"{cfg.ckpt}: no tokenizer.model or tokenizer.json beside the weights (or tokenizer.model one folder up)")
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model, tokenizer


def build_embedded_checkpoint(folder: Path, sample: Path):
    """A tiny random LLaMA and a SentencePiece tokenizer trained on our sample, as a Meta-layout folder."""
    import sentencepiece

    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([train_prompt(r) for r in load_records(sample)]), model_writer=model_file,
        vocab_size=800, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        # whitespace kept as LLaMA's model keeps it: the answer-only labels start exactly at the output
        remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        split_digits=True,
    )
    args = llama.ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=800, multiple_of=32, max_seq_len=512)
    torch.manual_seed(0)
    model = llama.Transformer(args)
    params = {k: v for k, v in dataclasses.asdict(args).items() if k != "ffn_hidden_dim"}
    write_atomically(folder / "tokenizer.model", lambda tmp: tmp.write_bytes(model_file.getvalue()))
    write_atomically(folder / "consolidated.00.pth", lambda tmp: torch.save(model.state_dict(), tmp))
    write_atomically(folder / "params.json", lambda tmp: tmp.write_text(json.dumps(params, indent=2)))


# --------------------------------------------------------------------------------------------
# Training machinery (the data, its batches and their parts: data/batches.py)


ROUTING_SEED_STRIDE = 100003  # a prime above 10^5 steps: nearby --seed values draw apart


def routed_samples(n: int, route_p: float, seed: int, step: int) -> torch.Tensor:
    """Routing (METHOD.md item 5) seeded by (seed, step) alone: every process, and a resumed run, draws the same."""
    return route(n, route_p, torch.Generator().manual_seed(seed * ROUTING_SEED_STRIDE + step))


def accumulate_gradients(model, echo, examples, routed, cfg: Config, pad_id: int, device, world: int, rank: int):
    """Forward, loss and backward of this process's slice of the step, micro-batch by micro-batch,
    each as length-sorted parts (`padded_parts`; their sums are divided by counts of the whole step,
    so the gradients summed over processes are one big batch's). Without the Echo path each part's
    backward runs at once; with it the parts share one Echo pass. Returns this process's (ce, echo)
    losses, summed on the device, and the number of real tokens computed."""
    step_batch = collate(examples, not cfg.answer_only_loss, pad_id)
    n_ce_step = micro_batch_targets(step_batch)
    n_answer = max(int((step_batch.answer_targets != IGNORE_INDEX).sum()), 1)
    micros_per_step = cfg.batch_size // cfg.micro_batch_size  # over all processes
    losses, tokens = torch.zeros(2, device=device), 0
    for start, end in micro_batch_slices(len(examples), world, rank, cfg.micro_batch_size, micros_per_step // world):
        micro = collate(examples[start:end], not cfg.answer_only_loss, pad_id)
        # the recipe: each micro-batch's own mean, over the step's micro-batches (HF Trainer's accumulation)
        ce_divisor = n_ce_step if cfg.token_mean_loss else micro_batch_targets(micro) * micros_per_step
        parts = padded_parts([len(ids) for ids, _ in examples[start:end]])
        batches = [collate([examples[start + i] for i in part], not cfg.answer_only_loss, pad_id) for part in parts]
        tokens += sum(int(batch.real.sum()) for batch in batches)
        batches = [batch.to(device) for batch in batches]
        routed_rows = [routed[start:end][part].to(device) for part in parts]
        groups = [(batches, routed_rows)] if echo is not None else [([b], [r]) for b, r in zip(batches, routed_rows)]
        for group, group_routed in groups:
            with checkpoints.autocast(device, cfg.precision), checkpoints.cpu_attention_kernel(device):
                ce_sum, echo_sum = loss_terms(model, group, echo, group_routed)
            loss = ce_sum / ce_divisor + echo_sum / n_answer
            loss.backward()
            losses += torch.stack([ce_sum.detach() / ce_divisor, echo_sum.detach() / n_answer])
    return losses, tokens


def lr_at(step: int, cfg: Config, total_steps: int) -> float:
    """Linear warm-up over warmup_steps, then linear decay to zero at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * max(0.0, (total_steps - step) / max(1, total_steps - cfg.warmup_steps))


def micro_batch_targets(batch: Batch) -> int:
    """The tokens the plain cross-entropy is taken on in `batch` (at least 1)."""
    return max(int((batch.ce_targets != IGNORE_INDEX).sum()), 1)


@torch.no_grad()
def validation_loss(model, examples, cfg: Config, pad_id: int, device) -> float:
    """Plain cross-entropy per target token on the validation records (dropout off)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), cfg.micro_batch_size):
        batch = collate(examples[start:start + cfg.micro_batch_size], not cfg.answer_only_loss, pad_id).to(device)
        with checkpoints.autocast(device, cfg.precision):
            ce_sum, _ = loss_terms(model, [batch])
        total += ce_sum.item()
        count += int((batch.ce_targets != IGNORE_INDEX).sum())
    model.train()
    return total / max(count, 1)


def all_reduce_gradients(params):
    """Sum the gradients over data-parallel processes (each holds its part of the step's sums)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def parameter_groups(model, echo: EchoPath | None) -> list[dict]:
    """The optimizer's groups, each with the multiple of the schedule's lr it trains at: one group unless
    --echo-lr-scale sets the Echo path apart, so an unscaled run's optimizer state is what it always was."""
    adapters = {"params": trainable_parameters(model), "lr_scale": 1.0}
    if echo is None:
        return [adapters]
    if echo.config.lr_scale == 1:
        return [adapters | {"params": adapters["params"] + list(echo.parameters())}]
    return [adapters, {"params": list(echo.parameters()), "lr_scale": echo.config.lr_scale}]


def check_examples(cfg: Config, data: TrainingData, max_positions: int):
    """Records that leave nothing to train on, no answer to learn, or do not fit the model."""
    if not data.train:
        raise ValueError(f"{cfg.data}: {len(data.val)} records and --val-size {cfg.val_size} leave none to train on")
    for name, part in (("training", data.train), ("validation", data.val)):
        if part and not any(label != IGNORE_INDEX for _, labels in part for label in labels):
            raise ValueError(f"--cutoff {cfg.cutoff} cuts off the answer of every {name} record of {cfg.data}: "
                             "no answer token to learn from or to validate on; raise --cutoff")
    longest = max(len(ids) for ids, _ in data.train + data.val)
    if longest > max_positions:
        raise ValueError(f"--cutoff {cfg.cutoff}: records of {longest} tokens do not fit the {max_positions} "
                         f"positions of {cfg.ckpt}'s rotary table; lower --cutoff")


def stop_if_not_finite(step: int, cfg: Config, **values: float):
    """NaN or inf stops training, checked before each update and save: nothing non-finite is saved."""
    if not all(math.isfinite(v) for v in values.values()):
        raise ValueError(f"step {step}: " + ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in values.items())
                         + f": not finite, training stopped (--lr {cfg.lr:g} too high?); {cfg.out} keeps the last "
                         "finite adapter")


# --------------------------------------------------------------------------------------------
# The run folder: config.json (RUN_MARKER, every flag, versions, commit), metrics.jsonl,
# checkpoint.pt, the adapter and eval.py's files. A run there is continued (--resume) or replaced
# (--overwrite), never written over; a second train.py into it is refused while the first runs.

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "adapter.safetensors", "adapter_config.json")
# Flags that cannot change what a resumed run computes (a larger --max-steps is checked apart)
RESUME_MAY_CHANGE = {"out", "resume", "overwrite", "log_every", "save_every", "gradient_checkpointing", "max_steps"}
METRICS_ENTRY = {"step": Rule(int, lambda v: v >= 0, "a step >= 0"), str: float | None}


def holds_run(folder: Path) -> bool:
    try:
        return read_run_record(folder) is not None
    except ValueError:  # unreadable: no run to continue or replace (check_out_folder says why)
        return False


def taken(folder: Path) -> list[str]:
    return [name for name in RUN_FILES if (folder / name).exists()]


def default_out(base: str, resume: bool) -> str:
    """`base`, or (no --resume) when a run's files are there the first free `base`-2, -3, ..."""
    n = 1
    while not resume and taken(Path(base if n == 1 else f"{base}-{n}")):
        n += 1
    return base if n == 1 else f"{base}-{n}"


@contextlib.contextmanager
def run_folder(cfg: Config, rank: int):
    """--out for the run's life: checked before anything loads, and locked by rank 0 (which alone writes)."""
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


def check_out_folder(cfg: Config):
    """A resumed run must not change what it computes; files of a run's names without a run record
    (an HF folder's config.json) are never written over."""
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
    saved, now = record.get("config", {}), dataclasses.asdict(cfg)
    changed = [k for k in now if k in saved and saved[k] != now[k] and k not in RESUME_MAY_CHANGE]
    if "max_steps" in saved and (now["max_steps"] or math.inf) < (saved["max_steps"] or math.inf):  # 0: all epochs
        changed.append("max_steps")  # only a longer run continues this one
    if changed:
        raise ValueError(f"{out}: --resume with flags that change the run: "
                         + ", ".join(f"--{k.replace('_', '-')} {saved[k]} -> {now[k]}" for k in changed)
                         + "; start a new run (another --out) instead")


def prepare_run_folder(cfg: Config, step: int, record: dict):
    """--overwrite's old run (and eval.py's files) removed, config.json written, metrics.jsonl started or,
    on --resume, cut back to the checkpoint's step."""
    out = Path(cfg.out)
    if cfg.overwrite:
        for name in RUN_FILES + EVAL_FILES:
            (out / name).unlink(missing_ok=True)
    write_atomically(out / "config.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2)))
    metrics_file = out / "metrics.jsonl"
    kept = metrics_lines(metrics_file, step) if cfg.resume and metrics_file.exists() else []
    write_atomically(metrics_file, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))


def metrics_lines(path: Path, up_to_step: float) -> list[str]:
    """metrics.jsonl's lines up to `up_to_step`; a partial last line (killed mid-append) is dropped."""
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


def run_record(cfg: Config, args, n_train: int, n_echo_params: int, device) -> dict:
    import safetensors
    import sentencepiece
    import tiktoken

    # paths relative to the repository: a committed run names no machine's folders
    return {RUN_MARKER: 1, "config": dataclasses.asdict(cfg) | {"out": recorded_path(cfg.out)},
            "model_args": dataclasses.asdict(args), "train_records": n_train, "echo_parameters": n_echo_params,
            "command": recorded_command(sys.argv), "code": code_version(),
            "device": checkpoints.device_description(device),
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
        copy_adapter_tensors(adapter_parameters(model), state["adapter"], path)
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


def save_run(cfg: Config, step: int, total_steps: int, keep_last: bool, model, echo, optimizer, params, best_val: float):
    """Without validation the last step's adapter; a checkpoint every --save-every steps and at the end."""
    out, last = Path(cfg.out), step == total_steps
    if keep_last and last or step % cfg.save_every == 0:
        flat = torch.cat([p.detach().flatten() for p in params])
        stop_if_not_finite(step, cfg, largest_parameter=flat.abs().max().item())  # NaN propagates through max
    if keep_last and last:
        save_adapter(out, model, {"method": cfg.method, "ckpt": cfg.ckpt, "step": step})
    if step % cfg.save_every == 0 or last:
        save_checkpoint(out / "checkpoint.pt", step, model, echo, optimizer, best_val)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the one line that says what is left."""


def main(argv=None):
    cfg = parse_config(argv)
    try:
        with run_folder(cfg, int(os.environ.get("RANK", 0))):
            run(cfg)
    except (OSError, ValueError) as e:  # bad input found where it entered, a full disk: one line, no traceback
        raise SystemExit(str(e)) from None
    except KeyboardInterrupt:  # every file is written through a rename: what is on disk is whole
        kept = (f"{cfg.out}/checkpoint.pt is intact; --resume continues from it" if (Path(cfg.out) / "checkpoint.pt").is_file()
                else "no checkpoint was saved yet")
        raise Interrupted(f"train.py: interrupted; {kept}") from None


def cli(argv=None):
    """main, with Ctrl-C as one line (exit status 130, as a shell reports it)."""
    try:
        main(argv)
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(130)


def run(cfg: Config):
    # ---- config: flags, device, process group (the run folder is checked and held by main)
    echo_cfg = echo_config(cfg)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device, distributed = start_device(cfg)
    if rank == 0 and (slow := checkpoints.slow_precision_warning(device, cfg.precision,
                                                                 checkpoints.PRECISIONS[cfg.precision])):
        print(slow, file=sys.stderr)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)

    # ---- data, read first: a malformed file is reported before minutes of loading a 7B model
    records = read_records(cfg.data)

    # ---- model, adapters and the Echo path
    model, tokenizer = load_model(cfg, device, rank, world)
    torch.manual_seed(cfg.seed)  # the adapter initialisation depends on the seed alone
    add_adapters(model, targets=tuple(cfg.targets.split(",")), r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                 dora="dora" in cfg.method, adapter_only_dropout=cfg.adapter_only_dropout)
    echo = EchoPath(model, echo_cfg).to(device) if echo_cfg else None
    model.train()
    groups = parameter_groups(model, echo)
    params = [p for group in groups for p in group["params"]]
    examples = encode_examples(records, tokenizer, cfg.cutoff, cfg.cloze)  # tokenised by the model's tokenizer
    data = TrainingData(examples, cfg.val_size, cfg.val_seed, cfg.batch_size, cfg.seed, cfg.group_by_length)
    check_examples(cfg, data, model.max_positions)
    total_steps = min(cfg.epochs * data.steps_per_epoch, cfg.max_steps or math.inf)

    # ---- optimizer and schedule (lr_at: linear warm-up, then linear decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)

    # ---- resume, and the run folder
    step, best_val = 0, math.inf
    if cfg.resume:
        step, best_val = restore_checkpoint(out / "checkpoint.pt", model, echo, optimizer)
    if rank == 0:
        prepare_run_folder(cfg, step, run_record(cfg, model.args, len(data.train), echo.n_parameters() if echo else 0,
                                                  device))
        print(f"{cfg.method}: {sum(p.numel() for p in trainable_parameters(model)):,} adapter parameters"
              + (f" + {echo.n_parameters():,} echo parameters (training only)" if echo else "")
              + f"; {len(data.train)} training records, {total_steps} steps, lr {cfg.lr:g}, on {device}")
        if data.val and step == 0:  # the untouched model's loss, for reference
            val_loss = validation_loss(model, data.val, cfg, tokenizer.pad_id, device)
            append_metrics(out, {"step": 0, "val_loss": val_loss})

    # ---- the loop
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True)
    n_tokens, t_last = 0, time.perf_counter()  # this process's real tokens since the last tokens/s reading
    while step < total_steps:
        # batch: the step's examples (every process sees them all) and those routed to the Echo pass
        examples = data.batch(step)
        routed = routed_samples(len(examples), echo_cfg.route_p if echo_cfg else 0.0, cfg.seed, step)
        lr = lr_at(step, cfg, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        # forward, loss and backward over this process's micro-batches; sum over processes
        losses, tokens = accumulate_gradients(model, echo, examples, routed, cfg, tokenizer.pad_id, device, world, rank)
        if distributed:
            all_reduce_gradients(params)
            dist.all_reduce(losses)
        # clip and step; NaN stops the run before the update
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        stop_if_not_finite(step + 1, cfg, loss=losses.sum().item(), gradient_norm=grad_norm.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        diagnostics = echo.diagnostics.read() if echo else {}  # this process's Echo passes of the step
        if rank != 0:
            continue
        # log: loss, lr and real tokens/s over the last --log-every steps
        bar.update(1)
        n_tokens += tokens
        ce, echo_loss = losses.tolist()
        entry = {"step": step, "loss": ce + echo_loss, "ce": ce, "echo": echo_loss, "lr": lr,
                 "grad_norm": grad_norm.item(), "routed": int(routed.sum())}
        if step % cfg.log_every == 0:
            entry["tokens_per_s"] = n_tokens * world / (time.perf_counter() - t_last)
            n_tokens, t_last = 0, time.perf_counter()
            bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}")
        entry |= diagnostics
        # validate: the adapter with the best validation loss is the one kept (the recipe's choice)
        if data.val and (step % cfg.eval_every == 0 or step == total_steps):
            entry["val_loss"] = validation_loss(model, data.val, cfg, tokenizer.pad_id, device)
            stop_if_not_finite(step, cfg, val_loss=entry["val_loss"])
            if entry["val_loss"] < best_val:
                best_val = entry["val_loss"]
                save_adapter(out, model, {"method": cfg.method, "ckpt": cfg.ckpt, "step": step, "val_loss": best_val})
            bar.write(f"step {step}: val_loss {entry['val_loss']:.4f} (best {best_val:.4f})")
        append_metrics(out, entry)
        # save: without validation the last adapter is kept; a resumable checkpoint every --save-every steps
        save_run(cfg, step, total_steps, not data.val, model, echo, optimizer, params, best_val)
    bar.close()
    if rank == 0:
        print(f"adapter (the Echo path discarded): {out}/adapter.safetensors")
        data_dir = f" --data-dir {SAMPLE} --datasets boolq ARC-Easy" if embedded_name(cfg.ckpt) else ""
        print(f"evaluate it: python eval.py --ckpt {cfg.ckpt} --adapter {out}{data_dir}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    cli()
