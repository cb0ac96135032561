"""The adapter's files: adapter.safetensors (the tensors) and adapter_config.json (how to rebuild
the adapters, the base model they were trained on, the tensor file's SHA-256).

What echo_lora.py trains, written and read back with every check at this boundary: settings of
the wrong type, tensors that do not fit the model, NaN, a tensor file from another save, an
adapter put on another base model. peft's format: scripts/convert_peft.py.
"""

import hashlib
import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save as safetensors_bytes

from data.checkpoints import read_tensor_file
from data.files import Rule, read_bytes, read_json_shaped, write_atomically
from echo_lora import BLOCK_LINEARS, adapted_linears, add_adapters

ADAPTER_FILE, CONFIG_FILE = "adapter.safetensors", "adapter_config.json"


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """lora_A, lora_B (and magnitude for DoRA) of every adapted linear, keyed by model path.
    The Echo path's parameters are not adapter parameters (METHOD.md item 8)."""
    params = {}
    for path, module in adapted_linears(model).items():
        for name in ("lora_A", "lora_B", "magnitude") if module.dora else ("lora_A", "lora_B"):
            params[f"{path}.{name}"] = getattr(module, name)
    return params


def block_and_target(path: str) -> tuple[int, str]:
    """'layers.3.attention.wq' -> (3, 'wq')."""
    m = re.fullmatch(r"layers\.(\d+)\.(\w+\.\w+)", path)
    if not m or m.group(2) not in BLOCK_LINEARS.values():
        raise ValueError(f"{path!r} is not a block linear of a LLaMA model")
    return int(m.group(1)), m.group(2).split(".")[1]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that make up the adapter, e.g. 'layers.0.attention.wq.lora_A' -> (r, dim)."""
    return {name: p.detach() for name, p in adapter_parameters(model).items()}


def adapter_config(model: nn.Module) -> dict:
    """The add_adapters arguments that rebuild this model's adapters (layers None = all)."""
    modules = adapted_linears(model)
    if not modules:
        raise ValueError("the model has no adapters")
    settings = {(m.r, m.alpha, m.dropout.p, m.dora) for m in modules.values()}
    if len(settings) > 1:
        raise ValueError(f"the model's adapters differ in (r, alpha, dropout, dora): {sorted(settings)}")
    [(r, alpha, dropout, dora)] = settings
    sites = {block_and_target(path) for path in modules}
    blocks = sorted({i for i, _ in sites})
    targets = [t for t in BLOCK_LINEARS if t in {target for _, target in sites}]  # in block order
    if sites != {(i, t) for i in blocks for t in targets}:
        raise ValueError("the model's adapters are not the same targets in every adapted block")
    layers = None if blocks == list(range(len(model.layers))) else blocks
    return dict(r=r, alpha=alpha, dropout=dropout, dora=dora, targets=targets, layers=layers)



# adapter_config.json's shape (data.files.check_shape), checked before anything is built from it.
ADAPTER_CONFIG = {
    "r": Rule(int, lambda v: v >= 1, "an integer >= 1"), "alpha": Rule(float, lambda v: 0 < v < math.inf, "a number > 0"),
    "dropout": Rule(float, lambda v: 0 <= v < 1, "a number in [0, 1)"), "dora": bool,
    "targets": Rule([str], bool, "a non-empty list of names"),
    "layers": (None, Rule([Rule(int, lambda v: v >= 0, "a block index >= 0")], bool, "a non-empty list of block indices")),
    "tensors_sha256?": str, "base_model?": (None, {"shape?": {str: int}, "fingerprint?": str | None}),
}


def base_model_record(model: nn.Module) -> dict:
    """What an adapter records of the base model it was trained on: its shape, and the cheap
    fingerprint of its weights (checkpoints.weights_fingerprint; None for a model not read by llama.load)."""
    a = model.args
    shape = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.kv_heads, vocab_size=a.vocab_size,
                 hidden_dim=a.hidden_dim)
    return dict(shape=shape, fingerprint=getattr(model, "fingerprint", None))


def save_adapter(path, model: nn.Module, config: dict | None = None):
    """Write `path/adapter.safetensors` (adapter_state) and `path/adapter_config.json`
    (adapter_config, plus the entries of `config`; the adapter's own settings win).

    The two files are one unit: the config holds the SHA-256 of the tensor file and the base
    model's record, so a save interrupted between the two renames (tensors of one step, config
    of another) or an adapter put on another base is caught by load_adapter."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    settings = {**adapter_config(model), "base_model": base_model_record(model)}
    # The settings go into the tensor file's header too, under its SHA-256: the config's copy,
    # which a reader may edit, is checked against them (recorded_settings).
    data = safetensors_bytes({k: v.contiguous() for k, v in adapter_state(model).items()},
                             metadata={RECORDED_SETTINGS: json.dumps(settings)})
    full_config = {**(config or {}), **settings, "tensors_sha256": hashlib.sha256(data).hexdigest()}
    write_atomically(folder / ADAPTER_FILE, lambda tmp: tmp.write_bytes(data))
    write_atomically(folder / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(full_config, indent=2)))


def load_adapter(path, model: nn.Module) -> dict:
    """Load an adapter written by save_adapter into `model`, adding the adapters first if the
    model has none; returns the saved config."""
    folder = Path(path)
    config_file, tensor_file = folder / CONFIG_FILE, folder / ADAPTER_FILE
    config = read_json_shaped(config_file, ADAPTER_CONFIG)
    fit_adapters(model, config, config_file)
    try:
        data = read_bytes(tensor_file)
    except OSError as e:
        raise ValueError(f"{tensor_file}: cannot read adapter tensors: {e}") from None
    copy_adapter_tensors(model, read_tensor_file(tensor_file, data), tensor_file)
    # After the fit checks, so a tensor file that does not fit says how; an adapter written
    # before checksums were recorded has none to check.
    digest = hashlib.sha256(data).hexdigest()
    if config.get("tensors_sha256", digest) != digest:
        raise ValueError(f"{tensor_file}: its SHA-256 is not the one {config_file} records: the two files come "
                         "from different saves (an interrupted save?)")
    recorded = recorded_settings(data, tensor_file)
    changed = [key for key in recorded if config.get(key) != recorded[key]]
    if changed:  # an alpha edited after the save changes the merged weights: never scored silently
        raise ValueError(f"{config_file}: {', '.join(f'{k!r} is {json.dumps(config.get(k))}' for k in changed)}, but "
                         f"{tensor_file.name} was saved with {', '.join(json.dumps(recorded[k]) for k in changed)}: "
                         "the config was edited after the save")
    check_base_model(config.get("base_model"), model, config_file)
    return config


# The key of the adapter's settings in adapter.safetensors' header metadata.
RECORDED_SETTINGS = "echo_lora_adapter"


def recorded_settings(data: bytes, file: Path) -> dict:
    """The settings save_adapter wrote into the tensor file's header (a safetensors file is an
    8-byte header length, then the header's JSON); {} for a file written before they were."""
    try:
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        text = header.get("__metadata__", {}).get(RECORDED_SETTINGS)
        recorded = {} if text is None else json.loads(text)
        if not isinstance(recorded, dict):
            raise ValueError("not an object")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{file}: its recorded adapter settings cannot be read: {e}") from None
    return recorded


def check_base_model(saved: dict | None, model: nn.Module, file: Path):
    """An adapter loaded onto a base model other than the one it was trained on is an error."""
    if not saved:
        return  # written before the base model was recorded
    mine = base_model_record(model)
    if saved.get("shape") != mine["shape"]:
        raise ValueError(f"{file}: the adapter was trained on a base of shape {saved.get('shape')}, "
                         f"the model loaded has shape {mine['shape']}")
    if None not in (saved.get("fingerprint"), mine["fingerprint"]) and saved["fingerprint"] != mine["fingerprint"]:
        raise ValueError(f"{file}: the adapter was trained on other base weights (fingerprint {saved['fingerprint']}, "
                         f"the model loaded has {mine['fingerprint']}): wrong --ckpt?")


def fit_adapters(model: nn.Module, config: dict, file: Path):
    """Give `model` the adapters `config` describes, or check that the ones it has match."""
    if config["r"] > model.args.dim:  # a rank past the model's width adds nothing, and its tensors may not fit in memory
        raise ValueError(f"{file}: rank r {config['r']} is above the model's width {model.args.dim}")
    if not adapted_linears(model):
        try:
            add_adapters(model, config["targets"], config["r"], config["alpha"], config["dropout"], config["dora"],
                         config["layers"])
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None
        return
    have = adapter_config(model)
    all_blocks = list(range(len(model.layers)))
    for key, mine, theirs in [
        ("rank r", have["r"], config["r"]), ("alpha", have["alpha"], config["alpha"]),
        ("dora", have["dora"], config["dora"]),
        ("targets", sorted(have["targets"]), sorted(config["targets"])),
        ("layers", have["layers"] or all_blocks, sorted(config["layers"] or all_blocks)),
    ]:
        if mine != theirs:
            raise ValueError(f"{file}: the adapter has {key} {theirs!r} but the model's adapters have {mine!r}")


@torch.no_grad()
def copy_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], file: Path):
    """Copy `tensors` (adapter_state names) into the model's adapters: every key, every shape."""
    params = adapter_parameters(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"{file}: does not fit the model: missing {missing[:3]}{'...' * (len(missing) > 3)}, "
                         f"unexpected {unexpected[:3]}{'...' * (len(unexpected) > 3)}")
    for name, tensor in tensors.items():
        if tensor.shape != params[name].shape:
            raise ValueError(f"{file}: {name} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(params[name].shape)}")
        if not torch.isfinite(tensor).all():  # a diverged run's adapter: every output would be NaN
            raise ValueError(f"{file}: {name} holds NaN or infinite values")
    for name, tensor in tensors.items():
        params[name].copy_(tensor)
