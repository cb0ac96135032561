"""The adapter's files as plain tensors and dicts: adapter.safetensors and adapter_config.json (the
settings that rebuild the adapters, the base model, the tensor file's SHA-256), written and read
back with every check of the files. Which tensors make an adapter: echo_lora.py; peft's format:
scripts/convert_peft.py.
"""

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from data.checkpoints import read_tensor_file
from data.files import Rule, read_bytes, read_json_shaped, write_atomically

ADAPTER_FILE, CONFIG_FILE = "adapter.safetensors", "adapter_config.json"
# The key of the adapter's settings in adapter.safetensors' header metadata.
RECORDED_SETTINGS = "echo_lora_adapter"

# adapter_config.json's shape (data.files.check_shape), checked before anything is built from it.
ADAPTER_CONFIG = {
    "r": Rule(int, lambda v: v >= 1, "an integer >= 1"), "alpha": Rule(float, lambda v: 0 < v < math.inf, "a number > 0"),
    "dropout": Rule(float, lambda v: 0 <= v < 1, "a number in [0, 1)"), "dora": bool,
    "targets": Rule([str], bool, "a non-empty list of names"),
    "layers": (None, Rule([Rule(int, lambda v: v >= 0, "a block index >= 0")], bool, "a non-empty list of block indices")),
    "tensors_sha256?": str, "base_model?": (None, {"shape?": {str: int}, "fingerprint?": str | None}),
}


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], settings: dict, config: dict):
    """Write `folder`/adapter.safetensors and adapter_config.json (`config`, then `settings`, which win).
    The config holds the tensor file's SHA-256 and the tensor file's header the settings, so an
    interrupted save or an edited config is caught when read (check_adapter_files)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()},
                             metadata={RECORDED_SETTINGS: json.dumps(settings)})
    full_config = {**config, **settings, "tensors_sha256": hashlib.sha256(data).hexdigest()}
    write_atomically(folder / ADAPTER_FILE, lambda tmp: tmp.write_bytes(data))
    write_atomically(folder / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(full_config, indent=2)))


def read_adapter_config(folder: Path) -> dict:
    return read_json_shaped(folder / CONFIG_FILE, ADAPTER_CONFIG)


def read_adapter_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], bytes]:
    """The tensors of `folder`/adapter.safetensors, and the file's bytes (check_adapter_files)."""
    tensor_file = folder / ADAPTER_FILE
    try:
        data = read_bytes(tensor_file)
    except OSError as e:
        raise ValueError(f"{tensor_file}: cannot read adapter tensors: {e}") from None
    return read_tensor_file(tensor_file, data), data


def check_adapter_files(folder: Path, config: dict, data: bytes):
    """The tensor file's bytes `data` are the ones `config` was saved with: its SHA-256 (an adapter
    written before checksums were recorded has none to check) and the settings in its header."""
    config_file, tensor_file = folder / CONFIG_FILE, folder / ADAPTER_FILE
    digest = hashlib.sha256(data).hexdigest()
    if config.get("tensors_sha256", digest) != digest:
        raise ValueError(f"{tensor_file}: its SHA-256 is not the one {config_file} records: the two files come "
                         "from different saves (an interrupted save?)")
    try:  # a safetensors file is an 8-byte header length, then the header's JSON; {}: written before settings were
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        text = header.get("__metadata__", {}).get(RECORDED_SETTINGS)
        recorded = {} if text is None else json.loads(text)
        if not isinstance(recorded, dict):
            raise ValueError("not an object")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{tensor_file}: its recorded adapter settings cannot be read: {e}") from None
    changed = [key for key in recorded if config.get(key) != recorded[key]]
    if changed:  # an alpha edited after the save changes the merged weights: never scored silently
        raise ValueError(f"{config_file}: {', '.join(f'{k!r} is {json.dumps(config.get(k))}' for k in changed)}, but "
                         f"{tensor_file.name} was saved with {', '.join(json.dumps(recorded[k]) for k in changed)}: "
                         "the config was edited after the save")


def check_base_model(saved: dict | None, mine: dict, file: Path):
    """An adapter whose recorded base model (`saved`) is not the one loaded (`mine`) is an error."""
    if not saved:
        return  # written before the base model was recorded
    if saved.get("shape") != mine["shape"]:
        raise ValueError(f"{file}: the adapter was trained on a base of shape {saved.get('shape')}, "
                         f"the model loaded has shape {mine['shape']}")
    if None not in (saved.get("fingerprint"), mine["fingerprint"]) and saved["fingerprint"] != mine["fingerprint"]:
        raise ValueError(f"{file}: the adapter was trained on other base weights (fingerprint {saved['fingerprint']}, "
                         f"the model loaded has {mine['fingerprint']}): wrong --ckpt?")


def check_fit(have: dict, config: dict, n_blocks: int, file: Path):
    """The adapters a model of `n_blocks` blocks has (`have`: echo_lora.adapter_config) are the
    ones `config` describes."""
    all_blocks = list(range(n_blocks))
    for key, mine, theirs in [
        ("rank r", have["r"], config["r"]), ("alpha", have["alpha"], config["alpha"]),
        ("dora", have["dora"], config["dora"]),
        ("targets", sorted(have["targets"]), sorted(config["targets"])),
        ("layers", have["layers"] or all_blocks, sorted(config["layers"] or all_blocks)),
    ]:
        if mine != theirs:
            raise ValueError(f"{file}: the adapter has {key} {theirs!r} but the model's adapters have {mine!r}")


@torch.no_grad()
def copy_adapter_tensors(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], file: Path):
    """Copy `tensors` into the adapter's parameters `params` (echo_lora.adapter_parameters), by
    name: every key, every shape, nothing NaN or infinite."""
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
