"""Before anything else on a new machine: our model and adapters against transformers and peft, and torchrun.

    python scripts/device_check.py --shape llama-7b     # on a CUDA machine: -> results/<device>-<date>/
    python scripts/device_check.py --shape tiny         # the same on a CPU, in seconds (tested)

Writes into --out, each file as its part is done:
  1. parity.json: a 2-block model of the shape, random weights, fp32 and bf16: our logits against
     LlamaForCausalLM's (through scripts/convert_hf.py and llama.load), our LoRA and DoRA logits and
     adapter gradients against peft's. A mismatch stops here.
  2. torchrun.json: `torchrun --nproc_per_node 1 train.py`, 3 steps of the embedded tiny model.
"""

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # convert_peft.py beside this file

import torch  # noqa: E402

import llama  # noqa: E402
from data import checkpoints  # noqa: E402
from data.checkpoints import autocast  # noqa: E402
from convert_hf import convert, hf_random_model, hf_to_meta_rows  # noqa: E402
from convert_peft import export_peft, name_from_peft_key, permute_qk_rows  # noqa: E402
from data.files import write_atomically  # noqa: E402
from echo_lora import DEFAULT_TARGETS, adapted_linears, adapter_parameters, add_adapters  # noqa: E402

# Relative error ||ours - theirs|| / ||theirs|| of the logits, and of all adapter gradients
# together. fp32: both sides compute the same function, only the order of operations differs
# (measured on a CPU, tiny shape: below 1e-6). bf16: each side rounds its activations to 8
# significant bits at different points (measured on a CPU, tiny shape: up to 6e-3).
PARITY_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}
TORCHRUN_STEPS = 3


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def write_json(path: Path, value: dict):
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2) + "\n"))


@torch.no_grad()
def randomize_adapters(model):
    """Non-zero B and a magnitude away from ||W||: every term of the adapters' formulas counts."""
    g = torch.Generator().manual_seed(1)
    for module in adapted_linears(model).values():
        module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.01)
        if module.dora:
            module.magnitude.mul_(1 + 0.2 * torch.rand(module.magnitude.shape, generator=g).to(module.magnitude.device))


def adapter_gradients(ours, peft_model) -> tuple[torch.Tensor, torch.Tensor]:
    """Every adapter gradient, ours and peft's, flattened in one order (peft's under our names,
    the q/k rows back in Meta order)."""
    theirs = {}
    for key, p in peft_model.named_parameters():
        if p.requires_grad:  # peft's names: the saved keys with ".default" (and a magnitude's ".weight")
            key = key.replace(".default", "")
            name = name_from_peft_key(key.removesuffix(".weight") if "magnitude" in key else key)
            theirs[name] = permute_qk_rows(ours, name, p.grad, hf_to_meta_rows)
    params = adapter_parameters(ours)
    names = sorted(params)
    if sorted(theirs) != names:
        raise ValueError("parity: peft's adapter parameters are not ours")
    return torch.cat([params[n].grad.flatten() for n in names]), torch.cat([theirs[n].flatten() for n in names])


def parity(args: llama.ModelArgs, device) -> list[dict]:
    """One check per comparison, with its relative error, on a 2-block model of `args`'s shape."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    small = dataclasses.replace(args, n_layers=2)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, args.vocab_size, (2, 64), generator=g).to(device)
    targets = torch.randint(3, args.vocab_size, (2, 64), generator=g).to(device)
    checks = []

    def check(precision, what, ours, theirs):
        error = ((ours.float() - theirs.float()).norm() / theirs.float().norm()).item()
        checks.append({"precision": precision, "what": what, "relative_error": error,
                       "tolerance": PARITY_TOLERANCE[precision], "ok": error < PARITY_TOLERANCE[precision]})

    for precision, dtype in checkpoints.PRECISIONS.items():
        with tempfile.TemporaryDirectory() as folder:
            hf = hf_random_model(small, device, dtype).eval()
            hf.save_pretrained(folder)
            meta = convert(folder, Path(folder) / "meta")  # our side reads the Meta layout
            ours = llama.load(meta, device, dtype)[0]
            with torch.no_grad(), autocast(device, precision):
                check(precision, "logits", ours(tokens), hf(input_ids=tokens).logits)
            for method in ("lora", "dora"):
                ours = llama.load(meta, device, dtype)[0]
                add_adapters(ours, DEFAULT_TARGETS, r=32, alpha=64, dropout=0.0, dora=method == "dora")
                randomize_adapters(ours)
                export_peft(Path(folder) / method, ours)
                theirs = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(device),
                                                   Path(folder) / method, is_trainable=True)
                logits = {}
                for name, run in (("ours", lambda: ours(tokens)), ("theirs", lambda: theirs(input_ids=tokens).logits)):
                    with autocast(device, precision):
                        logits[name] = run()
                        torch.nn.functional.cross_entropy(logits[name].float().flatten(0, 1), targets.flatten()).backward()
                check(precision, f"{method} logits", logits["ours"], logits["theirs"])
                check(precision, f"{method} adapter gradients", *adapter_gradients(ours, theirs))
    return checks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_smoke(device) -> dict:
    """`torchrun --nproc_per_node 1 train.py` for a few steps of the embedded tiny model, in a
    scratch folder; its exit code, metrics and the end of its output."""
    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                   "--master_port", str(free_port()), str(ROOT / "train.py"), "--max-steps", str(TORCHRUN_STEPS),
                   "--val-size", "0", "--out", "out"]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        metrics_file = Path(work) / "out" / "metrics.jsonl"
        metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.is_file() else []
    return {"command": "torchrun " + " ".join(command[3:]), "backend": "nccl" if device.type == "cuda" else "gloo",
            "returncode": done.returncode, "seconds": time.perf_counter() - started, "metrics": metrics,
            "output_tail": (done.stdout + done.stderr)[-3000:]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--shape", choices=llama.SHAPES, default="llama-7b",
                   help="the model's shape, random weights, 2 of its blocks (default: %(default)s)")
    p.add_argument("--out", type=Path, help="the folder of parity.json and torchrun.json "
                                            "(default: results/<device>-<date>)")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    slug = "".join(c if c.isalnum() else "-" for c in device_name(device).lower()).strip("-")
    out = a.out or Path("results") / f"{slug}-{time.strftime('%Y-%m-%d')}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"device check on {device_name(device)}, shape {a.shape}: results in {out}/", flush=True)

    started = time.perf_counter()
    try:
        checks = parity(llama.SHAPES[a.shape], device)
    except ValueError as e:
        raise SystemExit(f"device_check.py: {e}") from None
    write_json(out / "parity.json", {"device": device_name(device), "torch": torch.__version__,
                                     "shape": f"{a.shape}, 2 blocks", "checks": checks,
                                     "seconds": time.perf_counter() - started})
    for c in checks:
        print(f"parity {c['precision']} {c['what']}: relative error {c['relative_error']:.1e} "
              f"(tolerance {c['tolerance']:.0e}) {'ok' if c['ok'] else 'MISMATCH'}", flush=True)
    failed = [c for c in checks if not c["ok"]]
    if failed:
        raise SystemExit(f"device_check.py: parity failed: {failed[0]['precision']} {failed[0]['what']} differs by "
                         f"{failed[0]['relative_error']:.1e} (tolerance {failed[0]['tolerance']:.0e}); "
                         f"see {out / 'parity.json'}")

    smoke = torchrun_smoke(device)
    write_json(out / "torchrun.json", smoke)
    print(f"torchrun smoke ({smoke['backend']}): exit code {smoke['returncode']} in {smoke['seconds']:.0f} s", flush=True)
    if smoke["returncode"] != 0:
        raise SystemExit(f"device_check.py: torchrun train.py failed (exit code {smoke['returncode']}); "
                         f"see {out / 'torchrun.json'}")
    return {"parity": checks, "torchrun": smoke}


if __name__ == "__main__":
    main()
