"""The independent reference for tests: HF transformers' LlamaForCausalLM on our weights.

Test-only (transformers is a dev dependency). `hf_state_dict` applies the Meta -> HF q/k row
permutation the same way HF's own conversion script does, so HF computes rotary embeddings in
its rotate-half convention on the same function.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from llama import ModelArgs, Transformer
from scripts.convert_hf import HF_TO_META_LAYER_NAMES, HF_TO_META_NAMES, meta_to_hf_rows

META_TO_HF_NAMES = {v: k for k, v in HF_TO_META_NAMES.items()}
META_TO_HF_LAYER_NAMES = {v: k for k, v in HF_TO_META_LAYER_NAMES.items()}


def hf_config_dict(args: ModelArgs, tied: bool = False) -> dict:
    rope = {"rope_theta": args.rope_theta, "rope_type": "default"}
    if args.use_scaled_rope:
        rope.update(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
    return dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=args.vocab_size,
        hidden_size=args.dim, intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.kv_heads, rms_norm_eps=args.norm_eps,
        max_position_embeddings=args.max_seq_len, rope_parameters=rope, tie_word_embeddings=tied,
        hidden_act="silu", attention_bias=False, mlp_bias=False,
    )


def hf_key(meta_key: str) -> str:
    if meta_key in META_TO_HF_NAMES:
        return META_TO_HF_NAMES[meta_key]
    _, i, rest = meta_key.split(".", 2)
    return f"model.layers.{i}.{META_TO_HF_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    args, out = model.args, {}
    for key, w in model.state_dict().items():
        if key.endswith("attention.wq.weight"):
            w = meta_to_hf_rows(w, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            w = meta_to_hf_rows(w, args.kv_heads)
        out[hf_key(key)] = w.clone()
    return out


def hf_llama(model: Transformer, dtype=torch.float32):
    """LlamaForCausalLM (eval mode, eager attention) with exactly our weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**hf_config_dict(model.args), attn_implementation="eager")
    hf = LlamaForCausalLM(config).to(dtype)
    hf.load_state_dict(hf_state_dict(model))
    return hf.eval()


def write_hf_folder(model: Transformer, folder: Path, tied: bool = False) -> Path:
    """An HF-layout checkpoint folder (config.json + model.safetensors) of our weights."""
    folder.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(model)
    if tied:
        del state["lm_head.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config_dict(model.args, tied), indent=2))
    return folder


def write_meta_folder(model: Transformer, folder: Path) -> Path:
    """A one-shard Meta checkpoint folder (params.json + consolidated.00.pth) of our weights."""
    folder.mkdir(parents=True, exist_ok=True)
    a = model.args
    params = dict(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                  vocab_size=a.vocab_size, multiple_of=a.multiple_of, ffn_dim_multiplier=a.ffn_dim_multiplier,
                  norm_eps=a.norm_eps, rope_theta=a.rope_theta, use_scaled_rope=a.use_scaled_rope)
    (folder / "params.json").write_text(json.dumps(params))
    torch.save(model.state_dict(), folder / "consolidated.00.pth")
    return folder
