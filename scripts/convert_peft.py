"""Convert an adapter between this project's format and HF peft's, for HF-layout LLaMA models.

    python scripts/convert_peft.py to-peft out/lora-llama-7b out/lora-llama-7b-peft --ckpt llama-7b
    python scripts/convert_peft.py from-peft PEFT_FOLDER out/imported --ckpt llama-7b

HF permutes the rows of q and k (rotate-half rotary), so lora_B's rows and the magnitude of wq/wk
are permuted the same way; lora_A acts on the input side and is unchanged.
"""

import argparse
import json
import re
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo's modules importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn
from safetensors.torch import save_file

from data import checkpoints
from data.adapters import ADAPTER_FILE, CONFIG_FILE, copy_adapter_tensors
from data.checkpoints import read_tensor_file
from data.files import check_json_types, read_json, write_atomically
from echo_lora import (BLOCK_LINEARS, adapter_config, adapter_parameters, adapter_state, block_and_target, fit_adapters,
                       load_adapter, save_adapter)
from scripts.convert_hf import HF_TO_META_LAYER_NAMES, hf_to_meta_rows, meta_to_hf_rows

PEFT_ADAPTER_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's wrapper around LlamaForCausalLM, in every saved key
META_TO_HF_LINEARS = {meta: hf for hf, meta in HF_TO_META_LAYER_NAMES.items() if "." in meta}
TARGET_HF_NAMES = {target: META_TO_HF_LINEARS[path].split(".")[1] for target, path in BLOCK_LINEARS.items()}


def export_peft(path, model: nn.Module, config: dict | None = None):
    """Write the adapter in peft's format (adapter_config.json + adapter_model.safetensors) for an
    HF-format LLaMA, which `PeftModel.from_pretrained(hf_model, path)` loads to compute what `model`
    computes. `config` adds peft config fields, e.g. {"base_model_name_or_path": ...}."""
    ours = adapter_config(model)
    peft_config = {
        "base_model_name_or_path": None, **(config or {}),
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": ours["r"], "lora_alpha": ours["alpha"],
        "lora_dropout": ours["dropout"], "use_dora": ours["dora"], "use_rslora": False, "bias": "none",
        "target_modules": [TARGET_HF_NAMES[t] for t in ours["targets"]],
        "layers_to_transform": ours["layers"], "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {}
    for name, tensor in adapter_state(model).items():
        key = peft_key(name)
        tensors[key] = permute_qk_rows(model, name, tensor, meta_to_hf_rows).contiguous()
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    # peft writes this metadata; transformers' safetensors readers expect it.
    write_atomically(folder / PEFT_ADAPTER_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_atomically(folder / CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(peft_config, indent=2)))


def import_peft(path, model: nn.Module) -> dict:
    """Load a peft LoRA/DoRA adapter of an HF LLaMA (the folder `save_pretrained` writes) into
    `model`, adding the adapters first if it has none; returns the adapter's settings in this
    project's terms (the add_adapters arguments)."""
    folder = Path(path)
    config_file, tensor_file = folder / CONFIG_FILE, folder / PEFT_ADAPTER_FILE
    config = config_from_peft(read_json(config_file), config_file)
    fit_adapters(model, config, config_file)
    tensors = {}
    for key, tensor in read_tensor_file(tensor_file).items():
        try:
            name = name_from_peft_key(key)
        except ValueError as e:
            raise ValueError(f"{tensor_file}: {e}") from None
        tensors[name] = permute_qk_rows(model, name, tensor, hf_to_meta_rows)
    copy_adapter_tensors(adapter_parameters(model), tensors, tensor_file)
    return config


def config_from_peft(peft_config: dict, file: Path) -> dict:
    """add_adapters arguments from a peft LoraConfig; anything this adapter cannot compute
    exactly (rsLoRA scaling, per-module ranks, biases, extra trained modules) is an error."""
    unsupported = {
        "peft_type": lambda v: v != "LORA", "bias": lambda v: v not in (None, "none"),
        "use_rslora": bool, "rank_pattern": bool, "alpha_pattern": bool, "modules_to_save": bool,
        "fan_in_fan_out": bool, "lora_bias": bool, "exclude_modules": bool, "layer_replication": bool,
        "trainable_token_indices": bool, "target_parameters": bool, "alora_invocation_tokens": bool,
        "target_modules": lambda v: not isinstance(v, list),
        "layers_pattern": lambda v: v not in (None, "layers", ["layers"]),
    }
    missing = [k for k in ("peft_type", "r", "lora_alpha", "target_modules") if k not in peft_config]
    if missing:
        raise ValueError(f"{file}: missing peft settings {missing}")
    check_json_types(file, peft_config, {"r": int, "lora_alpha": float, "lora_dropout": float, "use_dora": bool,
                                         "layers_to_transform": int | list | None})
    for field, is_unsupported in unsupported.items():
        if field in peft_config and is_unsupported(peft_config[field]):
            raise ValueError(f"{file}: unsupported peft setting {field}={peft_config[field]!r}")
    hf_to_target = {hf: target for target, hf in TARGET_HF_NAMES.items()}
    unknown = [m for m in peft_config["target_modules"] if m not in hf_to_target]
    if unknown:
        raise ValueError(f"{file}: target_modules {unknown} are not LLaMA block linears {list(hf_to_target)}")
    layers = peft_config.get("layers_to_transform")
    return dict(
        r=peft_config["r"], alpha=peft_config["lora_alpha"], dropout=peft_config.get("lora_dropout", 0.0),
        dora=bool(peft_config.get("use_dora", False)),
        targets=[t for t in BLOCK_LINEARS if TARGET_HF_NAMES[t] in peft_config["target_modules"]],
        layers=[layers] if isinstance(layers, int) else layers,
    )


PEFT_SUFFIXES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}


def peft_key(name: str) -> str:
    """'layers.0.attention.wq.lora_A' -> 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'."""
    path, _, tensor = name.rpartition(".")
    i, target = block_and_target(path)
    return f"{PEFT_PREFIX}model.layers.{i}.{META_TO_HF_LINEARS[BLOCK_LINEARS[target]]}.{PEFT_SUFFIXES[tensor]}"


def name_from_peft_key(key: str) -> str:
    """The inverse of peft_key."""
    suffixes = {v: k for k, v in PEFT_SUFFIXES.items()}
    m = re.fullmatch(re.escape(PEFT_PREFIX) + r"model\.layers\.(\d+)\.(\w+\.\w+)\.(.+)", key)
    if not m or m.group(2) not in HF_TO_META_LAYER_NAMES or m.group(3) not in suffixes:
        raise ValueError(f"unexpected peft adapter key {key!r}")
    return f"layers.{m.group(1)}.{HF_TO_META_LAYER_NAMES[m.group(2)]}.{suffixes[m.group(3)]}"


def permute_qk_rows(model: nn.Module, name: str, tensor: torch.Tensor, permute) -> torch.Tensor:
    """Apply `permute` (meta_to_hf_rows or hf_to_meta_rows) to the output rows of a wq/wk
    lora_B or magnitude; every other tensor is returned as is."""
    path, _, kind = name.rpartition(".")
    _, target = block_and_target(path)
    heads = {"wq": model.args.n_heads, "wk": model.args.kv_heads}.get(target)
    if heads is None or kind == "lora_A":
        return tensor
    return permute(tensor, heads)



def main(argv=None):
    import llama

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("direction", choices=["to-peft", "from-peft"])
    parser.add_argument("source", type=Path, help="the adapter folder to convert")
    parser.add_argument("dest", type=Path, help="the folder written")
    parser.add_argument("--ckpt", required=True, help="the base model the adapter belongs to (its shape and heads)")
    parser.add_argument("--overwrite", action="store_true", help="replace an adapter already in dest (default: refuse)")
    a = parser.parse_args(argv)
    written = (PEFT_ADAPTER_FILE, CONFIG_FILE) if a.direction == "to-peft" else (ADAPTER_FILE, CONFIG_FILE)
    there = [name for name in written if (a.dest / name).exists()]
    if there and not a.overwrite:  # a finished run's adapter is never replaced unasked
        parser.exit(1, f"convert_peft.py: {a.dest} holds {', '.join(there)} already; --overwrite replaces it, "
                       "or give another dest\n")
    try:
        model, _ = llama.load(checkpoints.resolve_checkpoint(a.ckpt))
        if a.direction == "to-peft":
            load_adapter(a.source, model)
            export_peft(a.dest, model, {"base_model_name_or_path": a.ckpt})
        else:
            config = import_peft(a.source, model)
            save_adapter(a.dest, model, {"imported_from": str(a.source), **config})
    except (OSError, ValueError) as e:
        raise SystemExit(f"convert_peft.py: {e}") from None
    print(f"{a.dest}: written")


if __name__ == "__main__":
    main()
