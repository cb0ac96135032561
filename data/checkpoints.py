"""Reading a Meta checkpoint folder, checked at the boundary (params.json, the consolidated.NN.pth
shards, the tokenizer beside them), and the --ckpt, --device and --precision flags of train.py,
eval.py and bench.py. Every check names the file and what is wrong in one line; nothing is
unpickled that could run code (torch.load with weights_only).
"""

import contextlib
import hashlib
import math
import os
import platform
import re
import time
from dataclasses import fields
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from data.files import check_json_types, read_json, regular_file
from data.tokenizer import Tokenizer

# --------------------------------------------------------------------------------------------
# The folder and params.json


def meta_folder(ckpt_dir) -> Path:
    """`ckpt_dir`, checked to be a Meta checkpoint folder (params.json beside the shards); an HF
    folder is named as one, with the command that converts it."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: checkpoint folder not found")
    if not (ckpt_dir / "params.json").exists():  # a FIFO or folder there is refused by read_json
        if (ckpt_dir / "config.json").exists():
            raise FileNotFoundError(f"{ckpt_dir}: an HF-layout folder (config.json, no params.json); convert it "
                                    f"once: python scripts/convert_hf.py {ckpt_dir} DEST")
        raise FileNotFoundError(f"{ckpt_dir}: no params.json (a Meta checkpoint folder)")
    return ckpt_dir


def read_params(path: Path, args_class):
    """params.json as `args_class` (llama.ModelArgs): only its known keys, each of its type, each
    value one that builds a model."""
    params = read_json(Path(path))
    known = {f.name for f in fields(args_class)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"{path}: unknown params.json keys {unknown}; expected a subset of {sorted(known)}")
    check_json_types(path, params, {f.name: f.type for f in fields(args_class)})
    return check_model_args(args_class(**params), path)

def check_model_args(args, path: Path, keys: dict[str, str] | None = None) :
    """`args` as read from `path`, checked once, before any model is built from them: a value that
    builds no model or one that computes NaN (norm_eps -1, rope_theta 0) is a ValueError naming
    the file and its key (`keys`: the file's name for each field, an HF config.json's)."""
    inf = math.inf
    rules = [  # (field, test, the values it may take), in order: later tests rely on earlier ones
        ("dim", lambda a: a.dim > 0, "> 0"), ("n_layers", lambda a: a.n_layers > 0, "> 0"),
        ("n_heads", lambda a: a.n_heads > 0, "> 0"),
        ("n_kv_heads", lambda a: a.n_kv_heads is None or a.n_kv_heads > 0 and a.n_heads % a.n_kv_heads == 0,
         f"> 0 and a divisor of the {args.n_heads} query heads"),
        ("dim", lambda a: a.dim % (2 * a.n_heads) == 0, f"a multiple of 2 x {args.n_heads} heads (heads of "
         "one even size: rotary pairs)"),
        ("vocab_size", lambda a: a.vocab_size > 0 or a.vocab_size == -1, "> 0 (or -1: the tokenizer's)"),
        ("multiple_of", lambda a: a.multiple_of >= 1, ">= 1"),
        ("ffn_dim_multiplier", lambda a: a.ffn_dim_multiplier is None or 0 < a.ffn_dim_multiplier < inf,
         "> 0 and finite"),
        ("ffn_hidden_dim", lambda a: a.ffn_hidden_dim is None or a.ffn_hidden_dim > 0, "> 0"),
        ("norm_eps", lambda a: 0 < a.norm_eps < inf, "> 0 and finite"),
        ("rope_theta", lambda a: 0 < a.rope_theta < inf, "> 0 and finite"),
        ("max_seq_len", lambda a: a.max_seq_len >= 1, ">= 1"),
    ]
    for name, ok, allowed in rules:
        if not ok(args):
            key = (keys or {}).get(name, name)
            raise ValueError(f"{path}: {key!r} is {getattr(args, name)}, expected {allowed}")
    if args.hidden_dim < 1:
        raise ValueError(f"{path}: the FFN width from dim, multiple_of and ffn_dim_multiplier is {args.hidden_dim}")
    return args


def match_vocabulary(args, tokenizer: Tokenizer | None, ckpt_dir: Path):
    """Take vocab_size from the tokenizer where params.json leaves it -1 (LLaMA 1); a tokenizer
    whose size differs from the checkpoint's is an error, not ids past the embedding."""
    if args.vocab_size == -1:
        if tokenizer is None:
            raise FileNotFoundError(f"{ckpt_dir}/params.json: vocab_size is -1 and there is no tokenizer.model")
        args.vocab_size = tokenizer.n_words
    if tokenizer is not None and tokenizer.n_words != args.vocab_size:
        raise ValueError(f"{tokenizer.path}: tokenizer has {tokenizer.n_words} tokens but the checkpoint "
                         f"in {ckpt_dir} has vocab_size {args.vocab_size}")


def check_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Size], ckpt_dir: Path):
    """Exactly the model's weights, each of the shape its config gives."""
    for name, tensor in state.items():
        if name not in expected:
            raise ValueError(f"{ckpt_dir}: unexpected weight {name!r}")
        if tensor.shape != expected[name]:
            raise ValueError(f"{ckpt_dir}: {name} has shape {tuple(tensor.shape)}, the config says {tuple(expected[name])}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{ckpt_dir}: missing weights {missing[:5]}")


def find_tokenizer(ckpt_dir: Path) -> Tokenizer | None:
    """tokenizer.model or an HF tokenizer.json beside the weights, else tokenizer.model one folder
    up (Meta's download puts it there). An HF Llama 2 folder holds both files: the first wins."""
    for candidate in (ckpt_dir / "tokenizer.model", ckpt_dir / "tokenizer.json", ckpt_dir.parent / "tokenizer.model"):
        if candidate.is_file():
            return Tokenizer(candidate)
    return None


# --------------------------------------------------------------------------------------------
# The weights: consolidated.NN.pth shards


def read_weights(ckpt_dir: Path, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The model's weights from the folder's shards: exactly the names and shapes of `expected`
    (the model's state dict)."""
    state = read_meta_weights(ckpt_dir, expected)
    check_weights(state, expected, ckpt_dir)
    return state


def read_meta_weights(ckpt_dir: Path, expected: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Every shard of `meta_shards`, model-parallel shards merged per weight along the one dimension
    where a shard is smaller than the full weight (Meta splits by weight and by version); any other
    difference is a shard count or shape that does not fit params.json."""
    shards = meta_shards(ckpt_dir)
    parts = [read_tensor_file(s) for s in shards]
    state = {}
    for name, full in expected.items():
        pieces = []
        for shard, part in zip(shards, parts):
            if name not in part:
                raise ValueError(f"{shard}: missing weight {name!r}")
            pieces.append(part[name])
        state[name] = merge_shards(name, pieces, full, shards)
    for shard, part in zip(shards, parts):
        extra = sorted(set(part) - set(expected) - {"rope.freqs"})  # rope.freqs is recomputed
        if extra:
            raise ValueError(f"{shard}: unexpected weights {extra[:5]} for params.json")
    return state


def meta_shards(ckpt_dir: Path) -> list[Path]:
    """The shards: files named exactly consolidated.NN.pth, numbered 00 to K-1 without a gap.
    Other names the loose pattern consolidated.*.pth would take (consolidated.00.backup.pth, a
    copy) are ignored; a gap in the numbers is an error."""
    numbered = {int(m.group(1)): f for f in ckpt_dir.glob("consolidated.*.pth")
                if (m := re.fullmatch(r"consolidated\.(\d\d)\.pth", f.name))}
    if not numbered:
        raise FileNotFoundError(f"{ckpt_dir}: params.json but no consolidated.NN.pth shards")
    gaps = sorted(set(range(max(numbered) + 1)) - set(numbered))
    if gaps:
        raise ValueError(f"{ckpt_dir}: shards {', '.join(f'{i:02d}' for i in sorted(numbered))} but no "
                         f"consolidated.{gaps[0]:02d}.pth: Meta's shards are numbered 00 to K-1 without a gap")
    return [numbered[i] for i in range(len(numbered))]


def merge_shards(name, pieces, full: torch.Size, shards) -> torch.Tensor:
    shape = pieces[0].shape
    if shape == full and (len(pieces) == 1 or len(full) == 1):  # a single shard, or the replicated norms
        if any(not torch.equal(p, pieces[0]) for p in pieces[1:]):
            raise ValueError(f"{shards[0].parent}: {name} is replicated in every shard but the shards differ")
        return pieces[0]
    split = [d for d in range(len(full)) if shape[d] * len(pieces) == full[d]
             and all(shape[o] == full[o] for o in range(len(full)) if o != d)]
    if len(shape) != len(full) or not split or any(p.shape != shape for p in pieces):
        raise ValueError(f"{shards[0].parent}: {name} has shard shape {tuple(shape)} x {len(pieces)} shards, "
                         f"which does not make {tuple(full)} from params.json")
    return torch.cat(pieces, dim=split[0])


def read_tensor_file(file: Path, data: bytes | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a regular .safetensors file (or of `data`, its bytes already read), or of a
    .pth/.bin file read with weights_only (never unpickling anything that could run code). Only
    floating-point tensors: weights are never int8, bool or int64, and cast to float they would
    compute something silently wrong."""
    if data is None:
        regular_file(file)
    try:
        from safetensors.torch import load, load_file

        if data is not None or file.suffix == ".safetensors":
            tensors = load_file(str(file)) if data is None else load(data)
        else:
            tensors = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # the libraries raise many types; the user needs the file name
        raise ValueError(f"{file}: cannot read weights: {e}") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{file}: not a file of named tensors")
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{file}: {key} is {str(tensor.dtype).removeprefix('torch.')}; weights are floating point")
    return tensors


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A cheap fingerprint of a base model's weights: a hash of the first 64 values of every
    weight, as float32 (a bf16 file and its exact fp32 upcast agree). An adapter records it, so
    loading the adapter onto another base of the same shape is noticed."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]




# --------------------------------------------------------------------------------------------
# The --device, --precision and --ckpt flags of train.py, eval.py and bench.py


# The --precision of train.py, eval.py and bench.py: the dtype of the frozen weights. bf16 is the
# CUDA recipe (with fp32 adapters and bf16 autocast in training, `autocast`); it runs the same
# on a CPU, only slower. fp32 is the CPU default.
PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def device_and_precision(device: str | None, precision: str | None, cuda_precision: str = "bf16"):
    """--device and --precision as train.py, eval.py and bench.py read them: the device
    (resolve_device), and the precision given or, by default, `cuda_precision` on CUDA (the
    recipe's bf16; eval.py's is the protocol's fp16) and fp32 elsewhere."""
    device = resolve_device(device)
    return device, precision or (cuda_precision if device.type == "cuda" else "fp32")


def device_description(device) -> str:
    """What a run's record names its machine by: the GPU, or the CPU model, its cores and its bf16
    instructions (seeded runs are bit-identical on one CPU model, not across them)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        return f"cpu: {platform.processor() or 'unknown'}, {os.cpu_count()} cores"
    model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), []))
    bf16 = " ".join(f for f in ("amx_bf16", "avx512_bf16") if f in flags) or "no bf16 instructions"
    return f"cpu: {model}, {os.cpu_count()} cores, {bf16}"


# A half-precision matmul this many times slower than fp32 is emulated: a CPU with bf16
# instructions (AVX-512 BF16, AMX) ran bf16 2.2x faster than fp32, an AVX2-only one 30-60x slower.
SLOW_PRECISION = 4


def slow_precision_warning(device, precision: str, dtype: torch.dtype) -> str | None:
    """The line to print when --precision runs its matmuls much slower than fp32 on this CPU (a CPU
    without instructions for it emulates them); None on a GPU, for fp32, or when it runs fast."""
    if dtype == torch.float32 or torch.device(device).type != "cpu":
        return None
    slowdown = matmul_seconds(dtype) / matmul_seconds(torch.float32)
    if slowdown < SLOW_PRECISION:
        return None
    return (f"--precision {precision}: a {precision} matmul runs {slowdown:.0f}x slower than fp32 on this CPU (no "
            f"{precision} instructions); expect a slow run, --precision fp32 is faster here")


def matmul_seconds(dtype: torch.dtype, n: int = 256, reps: int = 3) -> float:
    """The time of `reps` (n, n) matmuls in `dtype` on the CPU, after one untimed. Its own generator:
    a seeded run's random stream is not touched."""
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(dtype)
    a @ a
    start = time.perf_counter()
    for _ in range(reps):
        a @ a
    return time.perf_counter() - start


def autocast(device, precision: str):
    """The bf16 recipe's autocast, on any device: matmuls in bf16 while the adapters, the DoRA
    norm and the losses stay fp32 (echo_lora.LoRALinear); off for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def cpu_attention_kernel(device):
    """On a CPU, SDPA's math kernel for training: at the recipe's short sequences (under 256
    tokens) its forward and backward take 0.6x the time of the CPU flash kernel, to the same
    accuracy (measured against fp64 in bf16). Elsewhere SDPA's own choice."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def resolve_device(name: str | None) -> torch.device:
    """`--device NAME` (default: cuda when available); a device torch cannot use here is a
    ValueError naming the flag, not a traceback at the first tensor moved there."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available to torch here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def resolve_checkpoint(name) -> Path:
    """`--ckpt NAME`: the folder checkpoints/NAME, else NAME itself as a path."""
    for candidate in (Path("checkpoints") / name, Path(name)):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"checkpoint {name!r}: neither checkpoints/{name}/ nor {name}/ is a folder "
                            f"(put params.json, consolidated.NN.pth and tokenizer.model there)")
