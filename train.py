"""Fine-tune LLaMA with LoRA, DoRA, Echo-LoRA or Echo-DoRA on commonsense_170k.

    python train.py                                   # the embedded default: a tiny model, a minute on a CPU
    python train.py --ckpt llama-7b --method echo-lora
    torchrun --nproc_per_node 8 train.py --ckpt llama-7b --method echo-dora

Reads top to bottom: configuration, model, data, training machinery, logging, then `main`: the loop. Defaults are the published
commonsense recipe (LLM-Adapters / DoRA): r 32, alpha 64, dropout 0.05 on q, k, v, up, down;
batch 16, 3 epochs, cutoff 256, 120 validation records, 100 warmup steps then linear decay,
AdamW without weight decay, random batches, the loss on the whole text (prompt and answer), each
micro-batch's loss its own mean, the same 120 validation records as upstream's `datasets` split,
DoRA's dropout as peft computes it. Every departure is an opt-in flag (docs/recipe.md,
"Departures from the recipe"). Every run writes, beside its adapter, config.json (every flag,
library versions, the checkpoint's params) and metrics.jsonl.
"""

import argparse
import dataclasses
import io
import json
import math
import os
import sys
import time
import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

import llama
from data.commonsense import IGNORE_INDEX, encode_cloze_record, encode_record, load_records, train_prompt
from data.files import EVAL_FILES, RUN_MARKER, code_version, locked_folder, output_folder, read_run_record, write_atomically
from echo_lora import (DEFAULT_TARGETS, ECHO_CHOICES, Batch, EchoConfig, EchoPath, add_adapters, adapter_parameters,
                       copy_adapter_tensors, loss_terms, route, save_adapter, trainable_parameters)

EMBEDDED = "tiny"  # the checkpoint `python train.py` builds and uses when given nothing
SAMPLE = Path(__file__).resolve().parent / "data" / "sample"  # our own small records (data/README.md)
METHODS = ("lora", "dora", "echo-lora", "echo-dora")
ECHO_DEFAULTS = EchoConfig()  # the Echo path's defaults live in echo_lora.EchoConfig alone
# The values a numeric flag may take: outside them is a parse error, not a traceback minutes later
# or a silently wrong run (a negative --grad-clip ascends the gradient). NaN fails every test.
POSITIVE, NOT_NEGATIVE = (lambda v: v >= 1, ">= 1"), (lambda v: v >= 0, ">= 0")
SEED = (lambda v: 0 <= v < 2**32, "in [0, 2^32)")  # numpy's and torch's seeds


def flag(default, help: str, *, choices=None, allowed=None, default_text: str = "", infinite: bool = False):
    """A Config field that is also a command-line flag: its default, its one-line meaning, the values
    it may take (`choices`, or `allowed`: a test and its wording; a float is finite unless
    `infinite`), and how `--help` states a default that means more than its value (`default_text`)."""
    return field(default=default, metadata=dict(help=help, choices=choices, allowed=allowed, default_text=default_text,
                                                infinite=infinite))


def finite(text: str) -> float:
    """A float flag's value: NaN and infinity are parse errors naming the flag, not a NaN loss
    blamed on --lr steps later."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def echo_flag(name: str, help: str, **kw):
    """A flag of the Echo path (METHOD.md): its default and choices are EchoConfig's for `name`."""
    default = getattr(ECHO_DEFAULTS, name)
    if isinstance(default, tuple) or default is None:  # block numbers, as a comma-separated flag
        return flag(",".join(map(str, default or ())), help, **kw)
    return flag(default, help, choices=ECHO_CHOICES.get(name), **kw)


def echo_flag_name(name: str) -> str:
    """Config's flag for EchoConfig's field `name`: pool -> echo_pool, echo_pass -> echo_pass."""
    return name if name.startswith("echo_") else "echo_" + name


@dataclass
class Config:
    ckpt: str = flag(EMBEDDED, "checkpoints/NAME or a path to a Meta or HF LLaMA folder; tiny is built on first use")
    method: str = flag("echo-lora", "lora and dora: the baselines; echo-: the same adapter trained with the Echo path",
                       choices=METHODS)
    data: str = flag("data/commonsense_170k.json", "one or more commonsense JSON files, comma-separated")
    out: str = flag("", "the run's folder: adapter, config.json, metrics.jsonl, checkpoint.pt",
                    default_text="out/<method>-<ckpt name>, or the first free -2, -3, ... beside it")
    # adapters (the recipe)
    r: int = flag(32, "adapter rank", allowed=POSITIVE)
    alpha: float = flag(64, "adapter scale: the update is alpha / r x B A",
                        allowed=(lambda v: 0 < v < math.inf, "> 0 and finite"))
    dropout: float = flag(0.05, "dropout on the adapters' input", allowed=(lambda v: 0 <= v < 1, "in [0, 1)"))
    targets: str = flag(",".join(DEFAULT_TARGETS), "adapted linears of every block, comma-separated Meta names "
                        "(wq, wk, wv, wo: attention; w1, w3, w2: gate, up, down)")
    # optimisation (the recipe)
    lr: float = flag(0.0, "peak learning rate",
                     allowed=(lambda v: 0 <= v < math.inf, ">= 0 and finite (0: the recipe's rate)"),
                     default_text="by method and model: 3e-4 for LoRA; DoRA 1e-4 on LLaMA-7B and Llama-3-8B, else 2e-4")
    batch_size: int = flag(16, "records per optimizer step, over all processes", allowed=POSITIVE)
    micro_batch_size: int = flag(16, "records per forward pass and process; accumulation makes up --batch-size",
                                 allowed=POSITIVE)
    epochs: int = flag(3, "passes over the training records", allowed=POSITIVE)
    cutoff: int = flag(256, "tokens kept of each record",
                       allowed=(lambda v: v >= 2, ">= 2 (BOS and at least one more token)"))
    warmup_steps: int = flag(100, "steps of linear warm-up, then linear decay to 0", allowed=NOT_NEGATIVE)
    grad_clip: float = flag(1.0, "largest gradient norm",
                            allowed=(lambda v: v > 0, "> 0 (inf: no clipping)"), infinite=True)
    # departures from the recipe, all off by default (docs/recipe.md)
    answer_only_loss: bool = flag(False, "departure: the plain cross-entropy on answer tokens only")
    token_mean_loss: bool = flag(False, "departure: one mean over the step's tokens, not a mean of micro-batch means")
    group_by_length: bool = flag(False, "departure (speed): batches of similar lengths, less padding, less random")
    adapter_only_dropout: bool = flag(False, "departure (speed, DoRA): dropout on the adapter path only")
    cloze: bool = flag(False, "departure (small models): train on 'Question: q / Answer: <the correct choice's "
                       "text>'; evaluate with eval.py --scoring cloze")
    val_size: int = flag(120, "validation records held out (0: none, the last adapter is kept)",
                         allowed=NOT_NEGATIVE)
    val_seed: int = flag(42, "seed of the validation split, apart from --seed: every run validates on the same records",
                         allowed=SEED)
    eval_every: int = flag(80, "steps between validation losses; the best adapter is kept (the recipe's eval_steps)",
                           allowed=POSITIVE)
    save_every: int = flag(200, "steps between resumable checkpoints", allowed=POSITIVE)
    max_steps: int = flag(0, "stop after this many steps (the schedule spans them)",
                          allowed=(lambda v: v >= 0, ">= 0 (0: all epochs)"))
    seed: int = flag(42, "seed of the adapters' initialisation, the batch order, dropout and routing",
                     allowed=SEED)
    # the Echo path (METHOD.md items 1-7; defaults and choices from EchoConfig); block numbers 1-based, comma-separated
    echo_source_layers: str = echo_flag("source_layers", "blocks whose states make the echo representation (item 1)",
                                        default_text="the deepest quarter of blocks")
    echo_target_layers: str = echo_flag("target_layers", "blocks whose adapters take the injection (item 3)",
                                        default_text="the shallowest quarter of blocks")
    echo_pool: str = echo_flag("pool", "the echo representation: mean over the prompt, or its last position (item 2)")
    echo_route_p: float = echo_flag("route_p", "stochastic routing: each sample's chance of the echo pass (item 5)")
    echo_distill: float = echo_flag("distill", "lambda, the masked distillation weight, >= 0 (item 7)")
    echo_tau: float = echo_flag("tau", "tau, the masked distillation temperature, > 0 (item 7)")
    echo_mask: str = echo_flag("mask", "answer-only masks; none leaks the answer (an ablation, needs --echo-pass full) "
                               "(item 4)")
    echo_pass: str = echo_flag("echo_pass", "suffix: recompute only the answer suffix; full: every position, the "
                               "reference (item 6)")
    echo_inject: str = echo_flag("inject", "echo: inject the deep signal; zero: the control, every Echo term "
                                 "run without it (item 4)")
    # machinery
    gradient_checkpointing: bool = flag(False, "recompute each block's activations in the backward pass: less memory")
    resume: bool = flag(False, "continue the run in --out from its checkpoint.pt")
    overwrite: bool = flag(False, "replace the run already in --out; without it a run there is refused")
    device: str = flag("", "cpu, cuda or cuda:N", default_text="cuda when available")
    precision: str = flag("", "bf16: the recipe's autocast; fp32: everything in fp32", choices=tuple(llama.PRECISIONS),
                          default_text="bf16 on cuda, fp32 elsewhere")
    log_every: int = flag(1, "steps between tokens/s readings (progress line and metrics.jsonl)",
                          allowed=POSITIVE)


# Per-checkpoint defaults for fields left unset on the command line. The embedded tiny model
# trains on our own small sample for a one-minute CPU demo; its lr is higher because its base
# model is random, so the adapters carry everything.
PRESETS = {
    EMBEDDED: dict(data=str(SAMPLE / "train.json"), val_size=40, warmup_steps=10, eval_every=20, save_every=50,
                   epochs=2, lr=2e-3),
}


# The files train.py writes in a run folder: it refuses to write over them unless asked, and
# --overwrite removes exactly these and eval.py's (EVAL_FILES), by name. What makes the folder a
# run is its config.json with train.py's RUN_MARKER (data.files.read_run_record).
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "adapter.safetensors", "adapter_config.json")
# Flags a resumed run may change, because they cannot change what it computes (--out: the run
# folder was moved; a larger --max-steps is checked apart: it continues the run further).
RESUME_MAY_CHANGE = {"out", "resume", "overwrite", "log_every", "save_every", "gradient_checkpointing", "max_steps"}
# DoRA's rates for r = 32 by base model, as NVlabs/DoRA's commonsense README lists them beside its
# rows (and its scripts pass them); eval.py prints those rows only beside runs at the same rate.
DORA_LR = {"llama7b": 1e-4, "llama27b": 2e-4, "llama38b": 1e-4}


def default_lr(method: str, ckpt: str) -> float:
    """The recipe's rates: 3e-4 for LoRA; for DoRA the published r = 32 row's rate of the base
    model (1e-4 LLaMA-7B, 2e-4 Llama-2-7B, 1e-4 Llama-3-8B), else 2e-4 (DoRA's other rows)."""
    if "dora" not in method:
        return 3e-4
    name = Path(ckpt).name.lower().replace("-", "").replace("_", "")
    return next((lr for key, lr in DORA_LR.items() if key in name), 1e-4 if "llama3" in name else 2e-4)


def flag_help(f: dataclasses.Field) -> str:
    """`--help`'s line for a Config field: its meaning, its default (and the embedded model's, where
    PRESETS sets another) and, for numbers, the values it may take."""
    meta = f.metadata
    default = meta["default_text"] or ("off" if f.type is bool else f.default)
    text = f"{meta['help']} (default: {default}"
    if f.name in PRESETS[EMBEDDED]:
        text += f"; with --ckpt {EMBEDDED}: {PRESETS[EMBEDDED][f.name]}"
    if meta["allowed"]:
        text += f"; {meta['allowed'][1]}"
    return (text + ")").replace("%", "%%")  # argparse formats help with %


def config_parser() -> argparse.ArgumentParser:
    """One flag per Config field: --name-with-dashes. Unset flags parse to None (False for a
    switch), so that what was given can be told apart from the defaults and PRESETS."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    for f in dataclasses.fields(Config):
        flag_name, help = "--" + f.name.replace("_", "-"), flag_help(f)
        if f.type is bool:
            parser.add_argument(flag_name, action="store_true", help=help)
        else:
            kind = finite if f.type is float and not f.metadata["infinite"] else f.type
            parser.add_argument(flag_name, type=kind, default=None, choices=f.metadata["choices"], help=help)
    return parser


def parse_config(argv=None) -> Config:
    parser = config_parser()
    # Only what was given on the command line (`0` is a value; unset is None, or False for a switch).
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None and v is not False}
    preset = PRESETS.get(Path(given.get("ckpt", EMBEDDED)).name, {})
    cfg = Config(**{**preset, **given})
    for f in dataclasses.fields(Config):
        ok, allowed = f.metadata["allowed"] or (None, "")
        if ok and not ok(getattr(cfg, f.name)):
            parser.error(f"--{f.name.replace('_', '-')} must be {allowed}, found {getattr(cfg, f.name)}")
    echo_flags = ["--" + k.replace("_", "-") for k in given if k.startswith("echo_")]
    if echo_flags and not cfg.method.startswith("echo-"):
        parser.error(f"{', '.join(echo_flags)} given with --method {cfg.method}, which has no Echo path")
    if cfg.resume and cfg.overwrite:
        parser.error("--resume continues the run in --out, --overwrite replaces it: give one")
    try:
        cfg.precision = cfg.precision or llama.default_precision(llama.resolve_device(cfg.device))
    except ValueError as e:
        parser.error(str(e))
    if cfg.batch_size % cfg.micro_batch_size:
        parser.error(f"--batch-size {cfg.batch_size} is not a multiple of --micro-batch-size {cfg.micro_batch_size}")
    cfg.lr = cfg.lr or default_lr(cfg.method, cfg.ckpt)
    cfg.out = cfg.out or default_out(f"out/{cfg.method}-{Path(cfg.ckpt).name}", cfg.resume)
    return cfg


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
def run_folder(cfg: Config, rank: int):
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
            raise SystemExit(f"--out {out}: cannot write a run there: {e.strerror or e}") from None
        except ValueError as e:  # a file in the way, another train.py's, an unreadable config.json
            raise SystemExit(str(e)) from None
        yield out


def check_out_folder(cfg: Config):
    """A folder holding a run is continued (--resume) or replaced (--overwrite), never silently
    written over; a resumed run must not change what the run computes, and needs the run's record
    to tell. A folder holding files of train.py's names but no run record (an HF model folder's
    config.json, a run whose config.json is gone) is never written into."""
    out = Path(cfg.out)
    record, names = read_run_record(out), taken(out)
    if record is None and names:
        raise SystemExit(f"{out}: holds {', '.join(names)} but no train.py run record (a config.json with "
                         f"{RUN_MARKER!r}): not a run to " + ("resume" if cfg.resume else "replace")
                         + "; give another --out")
    if record is None and cfg.resume:
        raise SystemExit(f"{out}: --resume given but there is no run there to resume")
    if record is None or cfg.overwrite:
        return
    if not cfg.resume:
        raise SystemExit(f"{out}: holds a run already; --resume continues it, --overwrite replaces it, "
                         "or give another --out")
    saved = record.get("config", {})
    now = dataclasses.asdict(cfg)
    changed = [k for k in now if k in saved and saved[k] != now[k] and k not in RESUME_MAY_CHANGE]
    if "max_steps" in saved and (now["max_steps"] or math.inf) < (saved["max_steps"] or math.inf):  # 0: all epochs
        changed.append("max_steps")  # only a longer run continues this one
    if changed:
        raise SystemExit(f"{out}: --resume with flags that change the run: "
                         + ", ".join(f"--{k.replace('_', '-')} {saved[k]} -> {now[k]}" for k in changed)
                         + "; start a new run (another --out) instead")


def echo_config(cfg: Config) -> EchoConfig | None:
    """The Echo path's EchoConfig from its --echo-* flags (None for lora and dora)."""
    if not cfg.method.startswith("echo-"):
        return None
    layers = lambda s: tuple(int(x) for x in s.split(",")) if s else None  # noqa: E731
    values = {f.name: getattr(cfg, echo_flag_name(f.name)) for f in dataclasses.fields(EchoConfig)}
    try:
        return EchoConfig(**{k: layers(v) if k.endswith("_layers") else v for k, v in values.items()})
    except ValueError as e:
        raise SystemExit(str(e)) from None


# --------------------------------------------------------------------------------------------
# The embedded default: a tiny random LLaMA and a tokenizer trained on our sample, written as an
# ordinary Meta-layout checkpoint so eval.py and everything else load it like a real one.


def build_embedded_checkpoint(folder: Path, sample: Path):
    import sentencepiece

    texts = [train_prompt(r) for r in load_records(sample)]
    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model_file, vocab_size=800, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        # As LLaMA's own SentencePiece model: whitespace kept as it is (identity normalisation,
        # whitespace-only pieces), so the prompt's 16-space indent is one piece, the answer-only
        # labels start exactly at the output, and the evaluation prompt ends as training saw it.
        remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        split_digits=True,
    )
    args = llama.ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=800, multiple_of=32,
                           max_seq_len=512)
    torch.manual_seed(0)
    model = llama.Transformer(args)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / "tokenizer.model", lambda tmp: tmp.write_bytes(model_file.getvalue()))
    write_atomically(folder / "consolidated.00.pth", lambda tmp: torch.save(model.state_dict(), tmp))
    params = {k: v for k, v in dataclasses.asdict(args).items() if k != "ffn_hidden_dim"}
    write_atomically(folder / "params.json", lambda tmp: tmp.write_text(json.dumps(params, indent=2)))


# --------------------------------------------------------------------------------------------
# Device and model


def start_device(cfg: Config, world: int) -> tuple[torch.device, bool]:
    """The run's device; under torchrun, its process group, joined
    even as its only process, so one GPU runs the multi-GPU code path (NCCL included). Returns
    (device, whether distributed)."""
    device = llama.resolve_device(cfg.device)
    distributed = "LOCAL_RANK" in os.environ
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.batch_size % (world * cfg.micro_batch_size):
        raise SystemExit(f"--batch-size {cfg.batch_size} must split into {world} processes x "
                         f"--micro-batch-size {cfg.micro_batch_size}")
    return device, distributed


def load_model(cfg: Config, device, rank: int, world: int):
    """The base model and its tokenizer (the embedded tiny model is built first if missing)."""
    if cfg.ckpt == EMBEDDED and not (Path("checkpoints") / EMBEDDED / "params.json").is_file():
        if rank == 0:
            print(f"no checkpoint given: building the embedded tiny model in checkpoints/{EMBEDDED}/")
            build_embedded_checkpoint(Path("checkpoints") / EMBEDDED, Path(PRESETS[EMBEDDED]["data"]))
        if world > 1:
            dist.barrier()
    try:
        model, tokenizer = llama.load(llama.resolve_checkpoint(cfg.ckpt), device=device,
                                      dtype=llama.PRECISIONS[cfg.precision])
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    if tokenizer is None:
        raise SystemExit(f"{cfg.ckpt}: no tokenizer.model or tokenizer.json beside the weights (or tokenizer.model one folder up)")
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model, tokenizer


def add_adapters_and_echo_path(model, cfg: Config, echo_cfg: EchoConfig | None, device) -> EchoPath | None:
    """Freeze the model, add the LoRA or DoRA adapters and, for echo- methods, the Echo path."""
    torch.manual_seed(cfg.seed)  # the adapter initialisation depends on the seed alone
    try:  # a target name or an echo layer the model does not have
        add_adapters(model, targets=tuple(cfg.targets.split(",")), r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                     dora="dora" in cfg.method, adapter_only_dropout=cfg.adapter_only_dropout)
        return EchoPath(model, echo_cfg).to(device) if echo_cfg else None
    except ValueError as e:
        raise SystemExit(str(e)) from None


# --------------------------------------------------------------------------------------------
# Data


def read_records(data: str) -> list[dict]:
    """The records of --data's comma-separated files; a malformed file is one error line."""
    try:
        return [r for path in data.split(",") for r in load_records(path)]
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None


# Seeds drawn from --seed and the epoch (batch order) or the step (routing) alone, never from a
# running generator, so a resumed run draws exactly what the uninterrupted one drew. The strides
# keep the seeds of nearby --seed values apart (seed 1's epoch 0 is not seed 0's epoch 1).
EPOCH_SEED_STRIDE = 1000  # more epochs than any run has
ROUTING_SEED_STRIDE = 100003  # a prime above 10^5 steps (the recipe is 32k at batch 16)


class TrainingData:
    """The records tokenised and split as the recipe does (training, validation) and each step's
    batch of training examples."""

    def __init__(self, records, tokenizer, cfg: Config, max_positions: int):
        examples = encode_examples(records, tokenizer, cfg.cutoff, cfg.cloze)
        train_idx, val_idx = split_validation(len(examples), cfg.val_size, cfg.val_seed)
        check_examples(examples, train_idx, val_idx, cfg, max_positions)
        self.train, self.val = [examples[i] for i in train_idx], [examples[i] for i in val_idx]
        self.steps_per_epoch = math.ceil(len(self.train) / cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.cfg, self.epoch, self.batches = cfg, None, []

    def batch(self, step: int) -> list[tuple[list[int], list[int]]]:
        """The examples of step `step`: its epoch's order depends on (--seed, epoch) alone."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            cfg, seed = self.cfg, self.cfg.seed * EPOCH_SEED_STRIDE + epoch
            lengths = [len(ids) for ids, _ in self.train]
            self.batches = (length_grouped_batches(lengths, cfg.batch_size, seed) if cfg.group_by_length
                            else random_batches(len(lengths), cfg.batch_size, seed))
            self.epoch = epoch
        return [self.train[i] for i in self.batches[index]]


def check_examples(examples, train_idx: list[int], val_idx: list[int], cfg: Config, max_positions: int):
    """Records that leave nothing to train on, no answer to learn, or do not fit the model: one
    error line naming the flag to change."""
    if not train_idx:
        raise SystemExit(f"{cfg.data}: {len(examples)} records and --val-size {cfg.val_size} leave none to train on")
    for name, part in (("training", train_idx), ("validation", val_idx)):
        if part and not any(label != IGNORE_INDEX for i in part for label in examples[i][1]):
            raise SystemExit(f"--cutoff {cfg.cutoff} cuts off the answer of every {name} record of {cfg.data}: "
                             "no answer token to learn from or to validate on; raise --cutoff")
    longest = max(len(ids) for ids, _ in examples)
    if longest > max_positions:
        raise SystemExit(f"--cutoff {cfg.cutoff}: records of {longest} tokens do not fit the {max_positions} "
                         f"positions of {cfg.ckpt}'s rotary table; lower --cutoff")


def encode_examples(records, tokenizer, cutoff: int, cloze: bool = False) -> list[tuple[list[int], list[int]]]:
    """(ids, answer-only labels) per record, in the protocol's template or the cloze form."""
    encode = encode_cloze_record if cloze else encode_record
    try:
        return [encode(tokenizer, r, cutoff) for r in records]
    except ValueError as e:
        raise SystemExit(f"--cloze: {e}") from None


def split_validation(n: int, val_size: int, val_seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) record indices as upstream's `datasets` train_test_split(test_size=
    val_size, shuffle=True, seed=val_seed) picks them: a permutation by numpy's default
    generator seeded with val_seed, whose first val_size entries are the validation records."""
    order = numpy.random.default_rng(val_seed).permutation(n).tolist()
    return order[val_size:], order[:val_size]


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """The recipe's batches: a random order of the n examples, cut into batch_size pieces."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffled batches of similar-length examples, so little compute goes to padding.

    Shuffle, cut into chunks of 64 batches, sort each chunk by length, cut it into batches,
    shuffle the batches: the order stays random but each batch's lengths are close.
    """
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    chunk = 64 * batch_size
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: -lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def collate(examples, train_on_inputs: bool, pad_id: int) -> Batch:
    """Right-pad, and shift labels so position t holds the label of token t + 1."""
    T = max(len(ids) for ids, _ in examples)
    tokens = torch.full((len(examples), T), pad_id, dtype=torch.long)
    valid = torch.zeros((len(examples), T), dtype=torch.bool)
    answer = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labels) in enumerate(examples):
        tokens[i, :len(ids)] = torch.tensor(ids)
        valid[i, :len(ids)] = True
        answer[i, :len(ids) - 1] = torch.tensor(labels[1:])
    if not train_on_inputs:
        return Batch(tokens, valid, answer, answer)
    ce = torch.full_like(answer, IGNORE_INDEX)  # the recipe's loss: every real next token
    ce[:, :-1] = torch.where(valid[:, 1:], tokens[:, 1:], IGNORE_INDEX)
    return Batch(tokens, valid, answer, ce)


# --------------------------------------------------------------------------------------------
# Training machinery


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr


def routed_samples(n: int, route_p: float, seed: int, step: int) -> torch.Tensor:
    """Stochastic routing (METHOD.md item 5) for this step: seeded by (seed, step), so every
    process, and a resumed run, draws the same samples."""
    return route(n, route_p, torch.Generator().manual_seed(seed * ROUTING_SEED_STRIDE + step))


def micro_batch_slices(n: int, world: int, rank: int, micro_batch_size: int, micros: int) -> list[tuple[int, int]]:
    """This process's part of a step's n examples, as (start, end) of up to `micros` micro-batches:
    process `rank` takes the rank-th of `world` equal shares, the last one also the remainder."""
    share = n // world
    end = (rank + 1) * share if rank < world - 1 else n
    slices = []
    for m in range(micros):
        start = rank * share + m * micro_batch_size
        stop = min(start + micro_batch_size, end)
        if start < stop:
            slices.append((start, stop))
    return slices


def accumulate_gradients(model, echo, examples, routed, cfg: Config, pad_id: int, device, world: int, rank: int):
    """Forward, loss and backward of this process's slice of the step's examples, micro-batch by
    micro-batch. Every process sees the whole step's batch and divides its sums by the step's token
    counts, so the gradients summed over processes are those of one big batch. Returns this
    process's (ce, echo) losses of the step, summed on the device (reading them per micro-batch
    would stall the GPU on every one), and the number of real tokens it computed.

    A micro-batch is computed as length-sorted parts (`padded_parts`): its loss is a sum over its
    tokens divided by counts of the whole micro-batch, so how its rows are grouped for the forward
    pass changes nothing but the padding computed."""
    step_batch = collate(examples, not cfg.answer_only_loss, pad_id)
    n_ce_step = micro_batch_targets(step_batch)
    n_answer = max(int((step_batch.answer_targets != IGNORE_INDEX).sum()), 1)
    micros_per_step = cfg.batch_size // cfg.micro_batch_size  # over all processes
    losses, tokens = torch.zeros(2, device=device), 0
    for start, end in micro_batch_slices(len(examples), world, rank, cfg.micro_batch_size, micros_per_step // world):
        micro = collate(examples[start:end], not cfg.answer_only_loss, pad_id)
        # the recipe: each micro-batch's mean over its own target tokens, divided by the step's
        # number of micro-batches (HF Trainer's gradient accumulation; DDP averages the processes)
        ce_divisor = n_ce_step if cfg.token_mean_loss else micro_batch_targets(micro) * micros_per_step
        for part in padded_parts([len(ids) for ids, _ in examples[start:end]]):
            batch = collate([examples[start + i] for i in part], not cfg.answer_only_loss, pad_id)
            tokens += int(batch.valid.sum())
            batch = batch.to(device)
            with autocast(device, cfg.precision), cpu_attention_kernel(device):
                ce_sum, echo_sum = loss_terms(model, batch, echo, routed[start:end][part].to(device))
            loss = ce_sum / ce_divisor + echo_sum / n_answer
            loss.backward()
            losses += torch.stack([ce_sum.detach() / ce_divisor, echo_sum.detach() / n_answer])
    return losses, tokens


# Rows per part of a micro-batch: sorted by length, parts of 4 of the recipe's random records pad
# 7-9% of their positions where the whole batch pads 28-38% (ARC-Easy; the four splits mixed),
# and 4 rows keep the matmuls large enough to run at full rate.
ROWS_PER_PART = 4


def padded_parts(lengths: list[int]) -> list[list[int]]:
    """The indices of a micro-batch's examples sorted by length, in parts of ROWS_PER_PART."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + ROWS_PER_PART] for i in range(0, len(order), ROWS_PER_PART)]


def lr_at(step: int, cfg: Config, total_steps: int) -> float:
    """Linear warm-up over warmup_steps, then linear decay to zero at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * max(0.0, (total_steps - step) / max(1, total_steps - cfg.warmup_steps))


def micro_batch_targets(batch: Batch) -> int:
    """The number of tokens the plain cross-entropy is taken on in `batch` (at least 1): a
    micro-batch's, or the whole step's for --token-mean-loss."""
    return max(int((batch.ce_targets != IGNORE_INDEX).sum()), 1)


@torch.no_grad()
def validation_loss(model, examples, cfg: Config, pad_id: int, device) -> float:
    """Plain cross-entropy per target token on the validation records (dropout off)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), cfg.micro_batch_size):
        batch = collate(examples[start:start + cfg.micro_batch_size], not cfg.answer_only_loss, pad_id).to(device)
        with autocast(device, cfg.precision):
            ce_sum, _ = loss_terms(model, batch)
        total += ce_sum.item()
        count += int((batch.ce_targets != IGNORE_INDEX).sum())
    model.train()
    return total / max(count, 1)


def autocast(device, precision: str = ""):
    """The bf16 recipe's autocast, on any device: matmuls in bf16 while the adapters, the DoRA
    norm and the losses stay fp32 (echo_lora.LoRALinear); off for fp32. Default: the device's."""
    precision = precision or llama.default_precision(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def cpu_attention_kernel(device):
    """On a CPU, SDPA's math kernel for training: at the recipe's short sequences (under 256
    tokens) its forward and backward take 0.6x the time of the CPU flash kernel, to the same
    accuracy (measured against fp64 in bf16). Elsewhere SDPA's own choice."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def all_reduce_gradients(params):
    """Sum the gradients over data-parallel processes (each holds its part of the step's sums)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def save_checkpoint(path: Path, step: int, model, echo, optimizer, best_val: float):
    state = {"step": step, "adapter": {k: v.detach() for k, v in adapter_parameters(model).items()},
             "echo": echo.state_dict() if echo else None, "optimizer": optimizer.state_dict(),
             "best_val": best_val, "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def restore_checkpoint(path: Path, model, echo, optimizer) -> tuple[int, float]:
    if not path.is_file():
        raise SystemExit(f"{path}: --resume given but there is no checkpoint to resume from")
    try:  # tensors and plain values only: a pickle that would run code is refused, never run
        state = torch.load(path, weights_only=True)
        copy_adapter_tensors(model, state["adapter"], path)
    except Exception as e:  # pickle, torch and format errors alike; the user needs the file name
        raise SystemExit(f"{path}: not a checkpoint this run can resume from: {str(e).splitlines()[0]}") from None
    if echo:
        echo.load_state_dict(state["echo"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["best_val"]


def stop_if_not_finite(step: int, out: Path, cfg: Config, **values: float):
    """NaN or inf stops training at once, with one line naming the step. Checked before each
    update and each save, so nothing non-finite is saved: the adapter in `out` stays the last
    finite one."""
    if all(math.isfinite(v) for v in values.values()):
        return
    raise SystemExit(f"step {step}: " + ", ".join(f"{k.replace('_', ' ')} {v:.4g}" for k, v in values.items())
                     + f": not finite, training stopped (--lr {cfg.lr:g} too high?); {out} keeps the last finite adapter")


def training_parameters(model, echo: EchoPath | None) -> list[torch.nn.Parameter]:
    """What the optimizer updates: the adapters and, while training, the Echo path."""
    return trainable_parameters(model) + (list(echo.parameters()) if echo else [])


def save_run(cfg: Config, out: Path, step: int, total_steps: int, keep_last: bool, model, echo, optimizer,
             best_val: float):
    """After a step: the adapter, when the last one is the one kept (no validation records) and
    this is the last step; a resumable checkpoint every --save-every steps and at the end. Nothing
    non-finite is saved."""
    last = step == total_steps
    if keep_last and last or step % cfg.save_every == 0:
        flat = torch.cat([p.detach().flatten() for p in training_parameters(model, echo)])
        stop_if_not_finite(step, out, cfg, largest_parameter=flat.abs().max().item())  # NaN propagates through max
    if keep_last and last:
        save_adapter(out, model, {"method": cfg.method, "ckpt": cfg.ckpt, "step": step})
    if step % cfg.save_every == 0 or last:
        save_checkpoint(out / "checkpoint.pt", step, model, echo, optimizer, best_val)


def metrics_lines(path: Path, up_to_step: int) -> list[str]:
    """The lines of metrics.jsonl up to `up_to_step`. A partial last line (the run was killed
    during its append) is dropped; a malformed line before it is an error."""
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for n, line in enumerate(lines, 1):
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, TypeError, KeyError):
            if n == len(lines):
                break
            raise SystemExit(f"{path}: line {n} is not a metrics entry") from None
        if step <= up_to_step:
            kept.append(line)
    return kept


# --------------------------------------------------------------------------------------------
# Logging


class Progress:
    """The progress bar (rank 0's): loss, lr and real tokens/s over the last --log-every steps."""

    def __init__(self, cfg: Config, step: int, total_steps: int, rank: int, world: int):
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


def prepare_run_folder(cfg: Config, out: Path, step: int, record: dict):
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


def append_metrics(out: Path, entry: dict):
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")


def run_record(cfg: Config, args: llama.ModelArgs, n_train: int, n_echo_params: int) -> dict:
    import safetensors
    import sentencepiece
    import tiktoken

    return {RUN_MARKER: 1, "config": dataclasses.asdict(cfg), "model_args": dataclasses.asdict(args), "train_records": n_train,
            "echo_parameters": n_echo_params, "command": " ".join(sys.argv), "code": code_version(),
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__,
                         "sentencepiece": sentencepiece.__version__, "tiktoken": tiktoken.__version__,
                         "safetensors": safetensors.__version__}}


def run_summary(cfg: Config, model, echo, n_train: int, total_steps: int, device) -> str:
    n_adapter = sum(p.numel() for p in trainable_parameters(model))
    return (f"{cfg.method}: {n_adapter:,} adapter parameters"
            + (f" + {echo.n_parameters():,} echo parameters (training only)" if echo else "")
            + f"; {n_train} training records, {total_steps} steps, lr {cfg.lr:g}, on {device}")


def main(argv=None):
    cfg = parse_config(argv)
    with run_folder(cfg, int(os.environ.get("RANK", 0))):
        run(cfg)


def run(cfg: Config):
    # ---- config: flags, device, process group (the run folder is checked and held by main)
    echo_cfg = echo_config(cfg)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device, distributed = start_device(cfg, world)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)

    # ---- data, read first: a malformed file is reported before minutes of loading a 7B model
    records = read_records(cfg.data)

    # ---- model, adapters and the Echo path
    model, tokenizer = load_model(cfg, device, rank, world)
    echo = add_adapters_and_echo_path(model, cfg, echo_cfg, device)
    model.train()
    params = training_parameters(model, echo)
    data = TrainingData(records, tokenizer, cfg, model.max_positions)  # tokenised by the model's tokenizer

    # ---- optimizer and schedule (lr_at: linear warm-up, then linear decay)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

    # ---- resume, and the run folder
    step, best_val = 0, math.inf
    if cfg.resume:
        step, best_val = restore_checkpoint(out / "checkpoint.pt", model, echo, optimizer)
    if rank == 0:
        record = run_record(cfg, model.args, len(data.train), echo.n_parameters() if echo else 0)
        prepare_run_folder(cfg, out, step, record)
        print(run_summary(cfg, model, echo, len(data.train), data.total_steps, device))
        if data.val and step == 0:  # the untouched model's loss, for reference
            val_loss = validation_loss(model, data.val, cfg, tokenizer.pad_id, device)
            append_metrics(out, {"step": 0, "val_loss": val_loss})

    # ---- the loop
    progress = Progress(cfg, step, data.total_steps, rank, world)
    while step < data.total_steps:
        # batch: the step's examples (every process sees them all) and those routed to the Echo pass
        examples = data.batch(step)
        routed = routed_samples(len(examples), echo_cfg.route_p if echo_cfg else 0.0, cfg.seed, step)
        lr = lr_at(step, cfg, data.total_steps)
        set_lr(optimizer, lr)
        # forward, loss and backward over this process's micro-batches; sum over processes
        losses, tokens = accumulate_gradients(model, echo, examples, routed, cfg, tokenizer.pad_id, device, world, rank)
        if distributed:
            all_reduce_gradients(params)
            dist.all_reduce(losses)
        # clip and step; NaN stops the run before the update
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        stop_if_not_finite(step + 1, out, cfg, loss=losses.sum().item(), gradient_norm=grad_norm.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        diagnostics = echo.diagnostics.read() if echo else {}  # this process's Echo passes of the step
        if rank != 0:
            continue
        # log
        entry = progress.step(step, tokens, losses, lr, grad_norm.item(), routed) | diagnostics
        # validate: the adapter with the best validation loss is the one kept (the recipe's choice)
        if data.val and (step % cfg.eval_every == 0 or step == data.total_steps):
            entry["val_loss"] = validation_loss(model, data.val, cfg, tokenizer.pad_id, device)
            stop_if_not_finite(step, out, cfg, val_loss=entry["val_loss"])
            if entry["val_loss"] < best_val:
                best_val = entry["val_loss"]
                save_adapter(out, model, {"method": cfg.method, "ckpt": cfg.ckpt, "step": step, "val_loss": best_val})
            progress.bar.write(f"step {step}: val_loss {entry['val_loss']:.4f} (best {best_val:.4f})")
        append_metrics(out, entry)
        # save: without validation the last adapter is kept; a resumable checkpoint every --save-every steps
        save_run(cfg, out, step, data.total_steps, not data.val, model, echo, optimizer, best_val)
    progress.bar.close()
    if rank == 0:
        print(f"adapter (the Echo path discarded): {out}/adapter.safetensors")
        data_dir = f" --data-dir {SAMPLE} --datasets boolq ARC-Easy" if cfg.ckpt == EMBEDDED else ""
        print(f"evaluate it: python eval.py --ckpt {cfg.ckpt} --adapter {out}{data_dir}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
