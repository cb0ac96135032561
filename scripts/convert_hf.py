"""Convert an HF LLaMA folder into the Meta layout llama.load reads (as gpt-fast converts once).

    python scripts/convert_hf.py checkpoints/smollm2-135m/hf checkpoints/smollm2-135m
    python scripts/convert_hf.py HF_FOLDER DEST --overwrite    # replace a DEST written before

Writes DEST/params.json (HF's intermediate_size as ffn_hidden_dim), consolidated.00.pth (Meta's
names, q/k rows un-permuted to adjacent rotary pairs, a tied output copied) and the tokenizer.
Whatever the model cannot compute exactly is refused, naming the file. params.json is written
last, so an interrupted run leaves no folder llama.load reads.
"""

import argparse
import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: make the repo's modules importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from data.checkpoints import check_model_args, check_weights, find_tokenizer, match_vocabulary, read_tensor_file
from data.files import inside, read_json, read_json_shaped, write_atomically
from data.tokenizer import Tokenizer
from llama import ModelArgs, Transformer

# The HF config.json key of each ModelArgs field read_hf_config fills, for check_model_args' errors.
HF_CONFIG_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                  "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size", "norm_eps": "rms_norm_eps",
                  "rope_theta": "rope_theta", "max_seq_len": "max_position_embeddings",
                  "ffn_hidden_dim": "intermediate_size"}



# An HF config.json's shape (data.files.check_shape): the keys read_hf_config reads (the values'
# ranges are check_model_args'); the rest of the file is transformers' alone.
ROPE = (None, {"rope_theta?": float, "rope_type?": str, "type?": str})
HF_CONFIG = {
    "hidden_size": int, "num_hidden_layers": int, "num_attention_heads": int, "num_key_value_heads?": int | None,
    "vocab_size": int, "intermediate_size": int, "head_dim?": int | None, "rms_norm_eps?": float, "rope_theta?": float,
    "max_position_embeddings?": int, "tie_word_embeddings?": bool, "hidden_act?": str, "model_type?": str | None,
    "architectures?": (None, [str]), "rope_scaling?": ROPE, "rope_parameters?": ROPE,
}
# An index's shape: which file holds each weight.
HF_INDEX = {"weight_map": {str: str}}


def read_hf_config(path: Path) -> tuple[ModelArgs, bool]:
    """ModelArgs from an HF config.json, and whether the output is tied; what cannot be computed exactly is an error."""
    cfg = read_json_shaped(path, HF_CONFIG)
    if cfg.get("model_type") != "llama" or any(a != "LlamaForCausalLM" for a in cfg.get("architectures") or []):
        raise ValueError(f"{path}: model_type {cfg.get('model_type')!r}, architectures {cfg.get('architectures')}: "
                         "only LLaMA checkpoints (model_type 'llama', LlamaForCausalLM) load here")
    if cfg.get("sliding_window") or cfg.get("use_sliding_window"):
        raise ValueError(f"{path}: sliding-window attention is not a LLaMA feature this model implements")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ValueError(f"{path}: {flag}=true is not a LLaMA feature this model implements")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {cfg['hidden_act']!r}, expected 'silu'")
    rope_theta, use_scaled_rope = read_hf_rope(cfg, path)
    args = ModelArgs(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads"), vocab_size=cfg["vocab_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=rope_theta,
        use_scaled_rope=use_scaled_rope, max_seq_len=cfg.get("max_position_embeddings", 2048),
        ffn_hidden_dim=cfg["intermediate_size"],
    )
    check_model_args(args, path, HF_CONFIG_KEYS)
    if cfg.get("head_dim") not in (None, args.head_dim):
        raise ValueError(f"{path}: head_dim {cfg['head_dim']} x heads != hidden_size; not implemented")
    return args, bool(cfg.get("tie_word_embeddings", False))


def read_hf_rope(cfg: dict, path: Path) -> tuple[float, bool]:
    """An HF config's rope theta, and whether Llama 3.1's scaling applies; other rope types and
    other llama3 scaling constants are errors (they would compute another function)."""
    rope = dict(cfg.get("rope_parameters") or {})  # transformers 5 nests theta and scaling here
    scaling = cfg.get("rope_scaling") or rope
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{path}: rope type {rope_type!r} is not implemented (only default and llama3)")
    if rope_type == "llama3":
        expected = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}
        found = {k: scaling.get(k) for k in expected}
        if found != expected:
            raise ValueError(f"{path}: llama3 rope scaling {found}, only Llama 3.1's {expected} is implemented")
    return rope.get("rope_theta", cfg.get("rope_theta", 10000.0)), rope_type == "llama3"


def hf_weight_files(ckpt_dir: Path) -> dict[Path, set[str] | None]:
    """Exactly the files an HF folder's index lists, each with the weights it names, or its single
    model.safetensors (None: all its weights; then the same for pytorch_model.bin): never a stray copy."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (ckpt_dir / index).exists():
            weight_map = read_json_shaped(ckpt_dir / index, HF_INDEX)["weight_map"]
            files = {inside(ckpt_dir, name, ckpt_dir / index): {k for k, v in weight_map.items() if v == name}
                     for name in sorted(set(weight_map.values()))}
            absent = [f.name for f in files if not f.exists()]
            if absent:
                raise FileNotFoundError(f"{ckpt_dir / index}: lists {absent} but they are not in the folder")
            return files
        if (ckpt_dir / single).is_file():
            return {ckpt_dir / single: None}
    raise FileNotFoundError(f"{ckpt_dir}: config.json but no model.safetensors, model.safetensors.index.json, "
                            "pytorch_model.bin or pytorch_model.bin.index.json")


def read_hf_weights(ckpt_dir: Path, args: ModelArgs, tied: bool) -> dict[str, torch.Tensor]:
    """Meta-named weights from the files of `hf_weight_files`, q/k rows un-permuted."""
    files = hf_weight_files(ckpt_dir)
    state = {}
    for file, named in files.items():
        tensors = read_tensor_file(file)
        lacking = sorted((named or set()) - set(tensors))
        if lacking:
            raise ValueError(f"{file}: the index names it for {lacking[:3]}, which it does not hold")
        for key, tensor in tensors.items():
            if named is not None and key not in named:
                continue  # the index names another file for it: this copy is not the model's
            try:
                name = hf_key_to_meta(key)
            except ValueError as e:
                raise ValueError(f"{file}: {e}") from None
            if name is None:
                continue
            if name.endswith("attention.wq.weight"):
                tensor = hf_to_meta_rows(tensor, args.n_heads)
            elif name.endswith("attention.wk.weight"):
                tensor = hf_to_meta_rows(tensor, args.kv_heads)
            state[name] = tensor
    if tied and "output.weight" not in state and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"].clone()  # the model stays untied
    return state


HF_TO_META_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
HF_TO_META_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}


def hf_key_to_meta(key: str) -> str | None:
    """Meta's name for an HF LlamaForCausalLM key; None for keys that carry no weights."""
    if key in HF_TO_META_NAMES:
        return HF_TO_META_NAMES[key]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", key)
    if m and m.group(2) in HF_TO_META_LAYER_NAMES:
        return f"layers.{m.group(1)}.{HF_TO_META_LAYER_NAMES[m.group(2)]}.weight"
    if key.endswith("rotary_emb.inv_freq"):  # recomputed, older HF files stored it
        return None
    raise ValueError(f"unexpected HF LLaMA weight {key!r}")


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's q/k row order (rotate-half pairs i, i + d/2) back to Meta's adjacent pairs."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's adjacent-pair q/k rows in HF's rotate-half order (what HF's converter does)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_hf_folder(src: Path) -> tuple[ModelArgs, dict[str, torch.Tensor], Tokenizer | None]:
    """An HF folder's ModelArgs, its Meta-named weights (checked against the config's shapes) and
    its tokenizer: everything llama.load needs, read and checked the way llama.load checks a
    Meta folder."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: checkpoint folder not found")
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src}: no config.json (an HF-layout folder)")
    tokenizer = find_tokenizer(src)
    args, tied = read_hf_config(src / "config.json")
    match_vocabulary(args, tokenizer, src)
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    state = read_hf_weights(src, args, tied)
    check_weights(state, expected, src)
    return args, state, tokenizer


# What convert writes into DEST, by name: the only files --overwrite replaces or removes.
META_FILES = ("params.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "config.json")
# The keys of an HF config.json a tokenizer.json's reader takes special ids from (data/tokenizer.py).
TOKENIZER_CONFIG_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
SHARD_NAME = re.compile(r"consolidated\.\d\d\.pth")


def convert(src, dest, overwrite: bool = False) -> Path:
    """Write the Meta-layout folder `dest` from the HF folder `src`; returns `dest`. An existing
    `dest` holding any of these files is refused unless `overwrite`."""
    src, dest = Path(src), Path(dest)
    args, state, tokenizer = read_hf_folder(src)
    if dest.resolve() == src.resolve():
        raise ValueError(f"{dest}: the destination is the HF folder itself; give another folder")
    ours = [f for f in dest.iterdir() if f.name in META_FILES or SHARD_NAME.fullmatch(f.name)] if dest.is_dir() else []
    if ours and not overwrite:
        raise FileExistsError(f"{dest}: already holds {sorted(f.name for f in ours)}; pass --overwrite to replace it")
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest}: exists and is not a folder")
    for f in sorted(ours, key=lambda f: f.name != "params.json"):  # params.json first: no half folder looks whole
        f.unlink()
    dest.mkdir(parents=True, exist_ok=True)

    seen = set()  # tensors sharing storage (a tied .bin) are saved apart, as the model stays untied
    plain = {}
    for name, tensor in state.items():
        tensor = tensor.contiguous()
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        plain[name] = tensor
    write_atomically(dest / "consolidated.00.pth", lambda tmp: torch.save(plain, tmp))
    if tokenizer is not None:
        copy_tokenizer(tokenizer, src, dest)
    params = json.dumps(dataclasses.asdict(args), indent=2) + "\n"
    write_atomically(dest / "params.json", lambda tmp: tmp.write_text(params))
    return dest


def copy_tokenizer(tokenizer: Tokenizer, src: Path, dest: Path):
    """The tokenizer file into `dest`; for a tokenizer.json also its tokenizer_config.json, and the
    special ids of the HF config.json as a config.json of those keys only (Llama 3 lists several
    end ids there). The copy is read back: it must give the source's vocabulary and special ids."""
    folder = tokenizer.path.parent
    write_atomically(dest / tokenizer.path.name, lambda tmp: shutil.copyfile(tokenizer.path, tmp))
    if tokenizer.path.suffix == ".json":
        if (folder / "tokenizer_config.json").is_file():
            write_atomically(dest / "tokenizer_config.json",
                             lambda tmp: shutil.copyfile(folder / "tokenizer_config.json", tmp))
        config = read_json(src / "config.json")
        ids = {k: config[k] for k in TOKENIZER_CONFIG_KEYS if k in config}
        if ids:
            write_atomically(dest / "config.json", lambda tmp: tmp.write_text(json.dumps(ids, indent=2) + "\n"))
    copied = Tokenizer(dest / tokenizer.path.name)
    same = ("n_words", "bos_id", "eos_id", "pad_id", "stop_ids", "add_bos")
    if [getattr(copied, k, None) for k in same] != [getattr(tokenizer, k, None) for k in same]:
        raise ValueError(f"{dest}: the copied tokenizer's special ids differ from {tokenizer.path}'s")


def hf_random_model(args: ModelArgs, device, dtype):
    """transformers' LlamaForCausalLM of the shape `args`, random weights, built directly in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                         num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                         num_key_value_heads=args.kv_heads, rms_norm_eps=args.norm_eps,
                         rope_parameters={"rope_theta": args.rope_theta, "rope_type": "default"},
                         max_position_embeddings=args.max_seq_len, tie_word_embeddings=False)
    torch.manual_seed(0)
    dtype_before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(dtype_before)



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("source", type=Path, help="the HF LLaMA folder (config.json + weights + tokenizer)")
    parser.add_argument("dest", type=Path, help="the Meta-layout folder written (llama.load's, --ckpt's)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of a DEST converted before")
    a = parser.parse_args(argv)
    try:
        convert(a.source, a.dest, overwrite=a.overwrite)
    except (OSError, ValueError) as e:
        raise SystemExit(f"convert_hf.py: {e}") from None
    print(f"{a.dest}: written; use it with --ckpt {a.dest}")


if __name__ == "__main__":
    main()
