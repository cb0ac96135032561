"""Measured speed and memory of our training step and decoding, beside HF transformers + peft.

    python bench.py --shape llama-7b --method lora dora echo-lora echo-dora
    python bench.py --shape llama-7b --data data/commonsense_170k.json --tokenizer checkpoints/llama-7b/tokenizer.model
    python bench.py --shape tiny                                      # a CPU smoke run

Random bf16 weights of a named shape (no checkpoint needed). Workloads:
- fixed: micro-batch 16 x 256 tokens, the loss on the last 8 tokens of each row (an "answer");
- data (`--data`): batches of 16 real records in the commonsense template, cutoff 256. Our side
  batches as train.py does (length-grouped); peft's as the upstream recipe does (random order,
  each batch padded to its longest, an attention mask). Reported as real (non-pad) tokens/s and
  the extrapolated time of the whole recipe (3 epochs of commonsense_170k's 170,420 records);
- decode: greedy, 32 new tokens for 32 prompts of about 120 tokens, new tokens/s;
- evaluation (`--test-sets`): eval.py's own decoding of real test-set prompts, greedy and 4 beams,
  as questions/s and the extrapolated minutes for the eight benchmarks' 22,420 questions. Random
  weights never stop early, so every reply runs the full 32 tokens: an upper bound on the time.
Every timing is after warm-up; on CUDA with events and `max_memory_allocated`. transformers and
peft are imported only here and in tests: they are the peer, never a dependency of the library.
Prints one table and writes bench.json, after every measurement (a run cut short keeps what it did).

`--suite device` is the one command for a GPU call (README "GPU"): LLaMA-7B shape, everything from
files in this repo (tests/assets: real records, the LLaMA-2 tokenizer, real test prompts), results
written to a folder part by part:
  1. parity.json: on a 2-block model of the shape, random weights, in fp32 and bf16: our logits
     against transformers' LlamaForCausalLM, our LoRA and DoRA logits and adapter gradients against
     peft's; a mismatch stops the run;
  2. torchrun.json: `torchrun --nproc_per_node 1 train.py` for 3 steps of the embedded tiny model
     (the process group: NCCL on CUDA, gloo on a CPU);
  3. bench.json and bench.md: the speed suite above, every method, with all three workloads.
    python bench.py --suite device                      # -> results/<device>-<date>/
    python bench.py --suite device --shape tiny         # the same on a CPU in seconds (tested)

`--suite experiment` is the real-model comparison (README "Results on a real model"): the untouched
model, then LoRA vs Echo-LoRA and DoRA vs Echo-DoRA per seed, trained by train.py and evaluated by
eval.py run by run within --budget-minutes, continued by the same command, ending with results.md:
    python bench.py --suite experiment --ckpt smollm2-135m --data-dir data --out results/smollm2-h100-<date>
"""

import argparse
import dataclasses
import gc
import hashlib
import json
import math
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import eval as evaluator
import llama
import train
from data.commonsense import IGNORE_INDEX, load_records
from data.files import inside, read_json, write_atomically
from echo_lora import (DEFAULT_TARGETS, TARGET_HF_NAMES, EchoConfig, EchoPath, adapter_parameters, adapted_linears,
                       add_adapters, export_peft, loss_terms, name_from_peft_key, permute_qk_rows, route,
                       trainable_parameters)
from tokenizer import Tokenizer
from train import (Timer, autocast, collate, encode_examples, length_grouped_batches, lora_ceiling_tokens_per_s,
                   matmul_tflops)

SHAPES = {
    "llama-7b": llama.ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
    "llama2-7b": llama.ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, max_seq_len=4096),
    "llama3-8b": llama.ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                                 multiple_of=1024, ffn_dim_multiplier=1.3, rope_theta=500000.0),
    "tiny": llama.ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=32),
}
RECIPE_RECORDS, RECIPE_EPOCHS = 170_420, 3
BENCHMARK_QUESTIONS = 22_420  # the eight commonsense test sets together
ANSWER_TOKENS = 8  # the fixed workload's "answer": about what a recipe record's answer is
ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "tests" / "assets"  # the device suite's real files: committed, so they travel with the repo
DEVICE_SUITE_FILES = {  # --data, --tokenizer, --test-sets of the device suite
    "data": ",".join(str(ASSETS / "data" / "commonsense" / name / "train.json")
                     for name in ("ARC-Challenge", "ARC-Easy", "boolq", "openbookqa")),
    "tokenizer": ASSETS / "models" / "llama2-tokenizer" / "tokenizer.model",
    "test_sets": ASSETS / "data" / "commonsense",
}
# Parity, relative error ||ours - theirs|| / ||theirs|| of the logits and of all adapter gradients
# together. fp32: both sides compute the same function, only the order of operations differs
# (measured on a CPU, tiny shape: below 1e-6). bf16: each side rounds its activations to 8
# significant bits at different points (measured on a CPU, tiny shape: up to 6e-3).
PARITY_TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


@contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_model(args: llama.ModelArgs, device, dtype) -> llama.Transformer:
    """Random weights (never zeros: a zero model would make every kernel's job trivial)."""
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):  # built in bf16: no fp32 copy of 7B weights
        model = llama.Transformer(args)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.02)
    return model


# --------------------------------------------------------------------------------------------
# Workloads: a list of batches, each a list of (ids, answer-only labels) examples


def fixed_workload(args, batch_size, seq_len, n_batches):
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(3, args.vocab_size, (batch_size, seq_len), generator=g).tolist()
        batches.append([(row, [IGNORE_INDEX] * (seq_len - ANSWER_TOKENS) + row[-ANSWER_TOKENS:]) for row in ids])
    return batches


def data_workloads(paths, tokenizer, batch_size, cutoff, n_batches):
    """(ours, upstream's) batches over the same records (comma-separated files): length-grouped
    vs random and padded."""
    examples = encode_examples([r for path in paths.split(",") for r in load_records(path)], tokenizer, cutoff)
    if not examples:
        raise ValueError(f"{paths}: holds no records")
    lengths = [len(ids) for ids, _ in examples]
    ours = length_grouped_batches(lengths, batch_size, seed=0)[:n_batches]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    theirs = [order[i:i + batch_size] for i in range(0, len(order), batch_size)][:n_batches]
    mean_tokens = sum(lengths) / len(lengths)
    return [[examples[i] for i in b] for b in ours], [[examples[i] for i in b] for b in theirs], mean_tokens


# --------------------------------------------------------------------------------------------
# Training steps


def our_step_fn(model, method, echo_pass, device, route_p, precision):
    """One optimiser step of train.py (forward, backward, AdamW) on one batch of examples."""
    add_adapters(model, DEFAULT_TARGETS, r=32, alpha=64, dropout=0.05, dora="dora" in method)
    echo = EchoPath(model, EchoConfig(route_p=route_p, echo_pass=echo_pass)).to(device) \
        if method.startswith("echo") else None
    params = trainable_parameters(model) + (list(echo.parameters()) if echo else [])
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()

    def step(examples):
        batch = collate(examples, False, 0).to(device)
        routed = route(len(examples), route_p, g).to(device)
        with autocast(device, precision):
            ce_sum, echo_sum = loss_terms(model, batch, echo, routed)
        n = (batch.answer_targets != IGNORE_INDEX).sum()
        ((ce_sum + echo_sum) / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(batch.valid.sum())
    return step


def hf_random_model(args: llama.ModelArgs, device, dtype):
    """transformers' LlamaForCausalLM of the same shape, built directly in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                         num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                         num_key_value_heads=args.kv_heads, rms_norm_eps=args.norm_eps,
                         rope_parameters={"rope_theta": args.rope_theta, "rope_type": "default"},
                         max_position_embeddings=args.max_seq_len, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        return LlamaForCausalLM(config)


def peft_step_fn(args, method, device, precision):
    """The same step through LlamaForCausalLM + get_peft_model, batches padded with a mask."""
    from peft import LoraConfig, get_peft_model

    hf_targets = [TARGET_HF_NAMES[t] for t in DEFAULT_TARGETS]  # q_proj, k_proj, ...: peft's names of ours
    model = get_peft_model(hf_random_model(args, device, llama.PRECISIONS[precision]), LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=hf_targets,
                                          use_dora=method == "dora", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    model.train()

    def step(examples):
        T = max(len(ids) for ids, _ in examples)
        ids = torch.tensor([e[0] + [0] * (T - len(e[0])) for e in examples], device=device)
        mask = torch.tensor([[1] * len(e[0]) + [0] * (T - len(e[0])) for e in examples], device=device)
        labels = torch.tensor([e[1] + [IGNORE_INDEX] * (T - len(e[1])) for e in examples], device=device)
        with autocast(device, precision):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(mask.sum())
    return step


def time_steps(step, batches, warmup, device):
    """Mean seconds per step and real tokens/s over the batches after `warmup` of them."""
    for examples in batches[:warmup]:
        step(examples)
    reset_peak(device)
    timer, tokens = Timer(device), 0
    with timer.region():
        for examples in batches[warmup:]:
            tokens += step(examples)
    n = len(batches) - warmup
    return {"step_s": timer.seconds / n, "tokens_per_s": tokens / timer.seconds, "peak_gib": peak_gib(device)}


# --------------------------------------------------------------------------------------------
# Decoding and the FLOP ceiling


def decode_prompts(args, n_prompts, prompt_len):
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(prompt_len - 20, prompt_len + 20, (n_prompts,), generator=g).tolist()
    return [torch.randint(3, args.vocab_size, (n,), generator=g).tolist() for n in lengths]


def time_our_decode(model, prompts, new_tokens, device):
    model.eval()
    llama.generate(model, prompts[:2], 2, stop_ids=[])
    timer = Timer(device)
    with timer.region():
        out = llama.generate(model, prompts, new_tokens, stop_ids=[])
    return {"new_tokens_per_s": sum(map(len, out)) / timer.seconds}


def time_hf_decode(args, prompts, new_tokens, device, dtype):
    hf = hf_random_model(args, device, dtype).eval()
    ids, valid = llama.left_pad(prompts, 0, device)
    T, mask = ids.shape[1], valid.long()
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    hf.generate(input_ids=ids[:2], attention_mask=mask[:2], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
    timer = Timer(device)
    with timer.region():
        out = hf.generate(input_ids=ids, attention_mask=mask, **kw)
    return {"new_tokens_per_s": (out.shape[1] - T) * len(prompts) / timer.seconds}


def time_evaluation(model, tokenizer, test_dir, per_set, device):
    """eval.py's decoding (sorted, batched, left-padded) of the first `per_set` questions of each
    test set found, greedy and with 4 beams: questions/s and minutes for all eight benchmarks."""
    import eval as evaluator

    test_sets = {name: load_records(test_dir / name / "test.json")[:per_set]
                 for name in evaluator.BENCHMARKS if (test_dir / name / "test.json").is_file()}
    model.eval()
    result = {}
    for beams in (1, 4):
        timer, n = Timer(device), sum(map(len, test_sets.values()))
        with timer.region():
            for name, records in test_sets.items():
                evaluator.evaluate(model, tokenizer, name, records, batch_size=32, num_beams=beams)
        qps = n / timer.seconds
        result[f"beams_{beams}"] = {"questions": n, "questions_per_s": qps,
                                    "minutes_for_8_benchmarks": BENCHMARK_QUESTIONS / qps / 60}
    return result


# --------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--suite", choices=["speed", "device", "experiment"], default="speed",
                   help="speed: the measurements below; device: parity, a torchrun smoke run, then speed (one GPU "
                        "call); experiment: Echo vs its base method on a real model, over seeds (default: speed)")
    p.add_argument("--shape", choices=SHAPES, help="the model's shape, random weights "
                                                 "(default: tiny (speed), llama-7b (device))")
    p.add_argument("--method", nargs="+", default=["lora", "dora", "echo-lora", "echo-dora"],
                   choices=["lora", "dora", "echo-lora", "echo-dora"], help="the methods timed (default: all four)")
    p.add_argument("--precision", choices=list(llama.PRECISIONS),
                   help="bf16: the recipe's autocast; fp32: everything in fp32 (default: bf16 on cuda, fp32 elsewhere)")
    p.add_argument("--batch-size", type=int, default=16, help="records per training step (default: 16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per record of the fixed workload (default: 256)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration, after warm-up (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per configuration (default: 3)")
    p.add_argument("--route-p", type=float, default=0.5,
                   help="the echo methods' stochastic routing, METHOD.md item 5 (default: 0.5)")
    p.add_argument("--data", help="commonsense JSON (comma-separated files): also time the real-record workload "
                                    "(default: none; device: tests/assets' records)")
    p.add_argument("--tokenizer", help="tokenizer.model for --data and --test-sets (its vocabulary must fit the shape) "
                                         "(default: none; device: the LLaMA-2 one in tests/assets)")
    p.add_argument("--test-sets", type=Path, help="folder of <benchmark>/test.json: time eval.py's decoding on them "
                                                    "(default: none; device: tests/assets' test sets)")
    p.add_argument("--questions-per-set", type=int, default=64, help="test prompts timed per benchmark (default: 64)")
    p.add_argument("--no-peft", action="store_true",
                   help="skip the transformers + peft peer (default: time it, when installed)")
    p.add_argument("--out", help="bench.json (speed; the default) or a folder (device; default results/<device>-<date>)")
    add_experiment_flags(p)
    a = p.parse_args(argv)
    a.shape = a.shape or ("llama-7b" if a.suite == "device" else "tiny")
    for flag, ok, allowed in (("batch_size", a.batch_size >= 1, ">= 1"), ("steps", a.steps >= 1, ">= 1"),
                              ("seq_len", ANSWER_TOKENS < a.seq_len <= 2 * SHAPES[a.shape].max_seq_len,
                               f"in ({ANSWER_TOKENS}, {2 * SHAPES[a.shape].max_seq_len}]"),
                              ("warmup", a.warmup >= 0, ">= 0"), ("route_p", 0 <= a.route_p <= 1, "in [0, 1]"),
                              ("questions_per_set", a.questions_per_set >= 1, ">= 1")):
        if not ok:  # a bad value is one line here, not a traceback (or a division by zero) later
            p.error(f"--{flag.replace('_', '-')} must be {allowed}, found {getattr(a, flag)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = a.precision or llama.default_precision(device)
    if a.suite == "device":
        return device_suite(a, p, device, precision)
    if a.suite == "experiment":
        return experiment_suite(a, p, device, precision, sys.argv[1:] if argv is None else argv)
    return measure_speed(a, p, device, precision, Path(a.out or "bench.json"))


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def write_json(path: Path, result: dict):
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))


def measure_speed(a, p, device, precision, out: Path) -> dict:
    """Training steps, decoding, evaluation and the ceiling; `out` is rewritten after each."""
    dtype = llama.PRECISIONS[precision]
    args = SHAPES[a.shape]
    with_peft = not a.no_peft and peft_available()
    mean_tokens = tokenizer = None
    if a.data or a.test_sets:
        if not a.tokenizer:
            p.error("--data and --test-sets need --tokenizer")
        if not Path(a.tokenizer).is_file():
            p.error(f"--tokenizer {a.tokenizer}: no such file")
        tokenizer = Tokenizer(a.tokenizer)
        if tokenizer.n_words > args.vocab_size:
            p.error(f"{a.tokenizer}: {tokenizer.n_words} tokens do not fit the {a.shape} shape's {args.vocab_size}")
    workloads = {"fixed 16x256": (fixed_workload(args, a.batch_size, a.seq_len, a.warmup + a.steps),) * 2}
    if a.data:
        try:
            ours, theirs, mean_tokens = data_workloads(a.data, tokenizer, a.batch_size, 256, a.warmup + a.steps)
        except (OSError, ValueError) as e:
            p.error(f"--data {e}")
        workloads["real records"] = (ours, theirs)

    # The ceiling first, so every row can state its fraction of it as soon as it is measured.
    tflops = matmul_tflops(device, dtype)
    ceiling = lora_ceiling_tokens_per_s(args, tflops)
    result = {"device": device_name(device), "torch": torch.__version__, "shape": a.shape, "dtype": str(dtype),
              "train": [], "decode": {}, "evaluation": None, "matmul_tflops": tflops,
              "lora_ceiling_tokens_per_s": ceiling, "mean_record_tokens": mean_tokens}
    rows = result["train"]

    def record(row):
        rows.append(row)
        if "tokens_per_s" in row:
            row["of_ceiling"] = row["tokens_per_s"] / ceiling
        add_ratios([r for r in rows if "tokens_per_s" in r])
        write_json(out, result)

    for workload, (ours, theirs) in workloads.items():
        for method in a.method:
            passes = ("suffix", "full") if method.startswith("echo") else ("-",)
            for echo_pass in passes:
                row = {"workload": workload, "impl": "ours", "method": method, "echo_pass": echo_pass}
                record(row | out_of_memory_guard(device, lambda: time_steps(
                    our_step_fn(random_model(args, device, dtype), method,
                                echo_pass if echo_pass != "-" else "suffix", device, a.route_p, precision),
                    ours, a.warmup, device)))
            if with_peft and method in ("lora", "dora"):
                row = {"workload": workload, "impl": "peft", "method": method, "echo_pass": "-"}
                record(row | out_of_memory_guard(device, lambda: time_steps(
                    peft_step_fn(args, method, device, precision), theirs, a.warmup, device)))

    prompts = decode_prompts(args, 32, 120)
    model = random_model(args, device, dtype)
    result["decode"]["ours"] = time_our_decode(model, prompts, 32, device)
    write_json(out, result)
    if a.test_sets:
        result["evaluation"] = time_evaluation(model, tokenizer, a.test_sets, a.questions_per_set, device)
        write_json(out, result)
    del model
    if with_peft:
        result["decode"]["transformers"] = time_hf_decode(args, prompts, 32, device, dtype)
        write_json(out, result)
    table = format_table(result, mean_tokens)
    print(table)
    if out.suffix == ".json":
        write_atomically(out.with_suffix(".md"), lambda tmp: tmp.write_text(table + "\n"))
    return result


def out_of_memory_guard(device, measure) -> dict:
    """`measure()`, or {"error": "out of memory"}: one configuration that does not fit is a row of
    the table, not the end of a GPU call."""
    gc.collect()  # the last configuration's model must be gone before this one's is built
    reset_peak(device)
    try:
        return measure()
    except torch.cuda.OutOfMemoryError:
        reset_peak(device)
        return {"error": "out of memory"}


# --------------------------------------------------------------------------------------------
# The device suite


def device_suite(a, p, device, precision) -> dict:
    """Parity (a mismatch stops here), the torchrun smoke run, then the speed suite at the shape
    (default llama-7b) on the repo's real files; each part's file is written as soon as it is done."""
    for key, path in DEVICE_SUITE_FILES.items():
        setattr(a, key, getattr(a, key) or path)
    out = Path(a.out or f"results/{device_slug(device)}-{time.strftime('%Y-%m-%d')}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"device suite on {device_name(device)}, shape {a.shape}, {precision}: results in {out}/", flush=True)

    started = time.perf_counter()
    checks = parity(SHAPES[a.shape], device)
    write_json(out / "parity.json", {"device": device_name(device), "torch": torch.__version__,
                                     "shape": f"{a.shape}, 2 blocks", "checks": checks,
                                     "seconds": time.perf_counter() - started})
    failed = [c for c in checks if not c["ok"]]
    for c in checks:
        print(f"parity {c['precision']} {c['what']}: relative error {c['relative_error']:.1e} "
              f"(tolerance {c['tolerance']:.0e}) {'ok' if c['ok'] else 'MISMATCH'}", flush=True)
    if failed:
        raise SystemExit(f"bench.py: parity failed: {failed[0]['precision']} {failed[0]['what']} differs by "
                         f"{failed[0]['relative_error']:.1e} (tolerance {failed[0]['tolerance']:.0e}); "
                         f"see {out / 'parity.json'}")

    smoke = torchrun_smoke(device)
    write_json(out / "torchrun.json", smoke)
    print(f"torchrun smoke ({smoke['backend']}): exit code {smoke['returncode']} in {smoke['seconds']:.0f} s", flush=True)
    if smoke["returncode"] != 0:
        raise SystemExit(f"bench.py: torchrun train.py failed (exit code {smoke['returncode']}); "
                         f"see {out / 'torchrun.json'}")
    return measure_speed(a, p, device, precision, out / "bench.json")


def device_slug(device) -> str:
    return "".join(c if c.isalnum() else "-" for c in device_name(device).lower()).strip("-")


def parity(args: llama.ModelArgs, device) -> list[dict]:
    """Our model against transformers' LlamaForCausalLM, and our LoRA / DoRA against peft, on a
    2-block model of `args`'s shape with random weights, in fp32 and bf16. Our side loads the HF
    model's saved folder with llama.load (the q/k row conversion included); the adapters cross
    over with export_peft. Returns one check per comparison, with its relative error."""
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

    for precision, dtype in llama.PRECISIONS.items():
        with tempfile.TemporaryDirectory() as folder:
            hf = hf_random_model(small, device, dtype).eval()
            hf.save_pretrained(folder)
            ours = llama.load(folder, device, dtype)[0]
            with torch.no_grad(), autocast(device, precision):
                check(precision, "logits", ours(tokens), hf(input_ids=tokens).logits)
            for method in ("lora", "dora"):
                ours = llama.load(folder, device, dtype)[0]
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
                ours_grads, theirs_grads = adapter_gradients(ours, theirs)
                check(precision, f"{method} adapter gradients", ours_grads, theirs_grads)
    return checks


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
        if p.requires_grad:  # peft's parameter names: the saved keys with ".default" (and a magnitude ".weight")
            key = key.replace(".default", "")
            name = name_from_peft_key(key.removesuffix(".weight") if "magnitude" in key else key)
            theirs[name] = permute_qk_rows(ours, name, p.grad, llama.hf_to_meta_rows)
    names = sorted(adapter_parameters(ours))
    if sorted(theirs) != names:
        raise SystemExit("bench.py: parity: peft's adapter parameters are not ours")
    params = adapter_parameters(ours)
    return (torch.cat([params[n].grad.flatten() for n in names]), torch.cat([theirs[n].flatten() for n in names]))


def torchrun_smoke(device, steps: int = 3) -> dict:
    """`torchrun --nproc_per_node 1 train.py` for a few steps of the embedded tiny model, in a
    scratch folder: train.py joins torchrun's process group (NCCL on CUDA, gloo on a CPU) and
    all-reduces every step's gradients."""
    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                   "--master_port", str(free_port()), str(ROOT / "train.py"), "--max-steps", str(steps),
                   "--val-size", "0", "--out", "out"]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        metrics_file = Path(work) / "out" / "metrics.jsonl"
        metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.is_file() else []
    return {"command": "torchrun " + " ".join(command[3:]), "backend": "nccl" if device.type == "cuda" else "gloo",
            "returncode": done.returncode, "seconds": time.perf_counter() - started, "metrics": metrics,
            "output_tail": (done.stdout + done.stderr)[-3000:]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peft_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("peft", "transformers"))


def add_ratios(rows):
    """Each row's tokens/s over its peer's in the same workload: peft's same method for ours
    (echo methods compare with peft's base method), our own base method's step for echo."""
    index = {(r["workload"], r["impl"], r["method"], r["echo_pass"]): r for r in rows}
    for r in rows:
        base = r["method"].removeprefix("echo-")
        peer = index.get((r["workload"], "peft", base, "-"))
        if r["impl"] == "ours" and peer:
            r["vs_peft"] = r["tokens_per_s"] / peer["tokens_per_s"]
        own = index.get((r["workload"], "ours", base, "-"))
        if r["method"].startswith("echo") and own:
            r["step_vs_own_base"] = r["step_s"] / own["step_s"]


def format_table(result, mean_tokens):
    lines = [f"device: {result['device']}, shape {result['shape']}, {result['dtype']}",
             "| workload | impl | method | echo pass | tokens/s | step ms | peak GiB | vs peft | step / own base | recipe hours | of ceiling |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["train"]:
        if "error" in r:
            lines.append("| " + " | ".join([r["workload"], r["impl"], r["method"], r["echo_pass"], r["error"]]
                                           + ["-"] * 6) + " |")
            continue
        hours = (RECIPE_EPOCHS * RECIPE_RECORDS * mean_tokens / r["tokens_per_s"] / 3600
                 if mean_tokens and r["workload"] == "real records" else None)
        cells = [r["workload"], r["impl"], r["method"], r["echo_pass"], f"{r['tokens_per_s']:,.0f}",
                 f"{1000 * r['step_s']:.1f}", fmt(r["peak_gib"], ".1f"), fmt(r.get("vs_peft"), ".2f", "x"),
                 fmt(r.get("step_vs_own_base"), ".2f", "x"), fmt(hours, ".2f"), fmt(r.get("of_ceiling"), ".1%")]
        lines.append("| " + " | ".join(cells) + " |")
    for impl, d in result["decode"].items():
        lines.append(f"greedy decode, 32 prompts x ~120 tokens, 32 new: {impl} {d['new_tokens_per_s']:,.0f} new tokens/s")
    if len(result["decode"]) == 2:
        lines.append(f"decode ratio ours / transformers: "
                     f"{result['decode']['ours']['new_tokens_per_s'] / result['decode']['transformers']['new_tokens_per_s']:.2f}x")
    for decoding, e in (result["evaluation"] or {}).items():
        lines.append(f"evaluation, {decoding.replace('_', ' ')}: {e['questions_per_s']:.1f} questions/s on "
                     f"{e['questions']} real test prompts -> {e['minutes_for_8_benchmarks']:.1f} min for the 8 benchmarks")
    lines.append(f"matmul {result['matmul_tflops']:.1f} TFLOP/s -> LoRA training ceiling "
                 f"{result['lora_ceiling_tokens_per_s']:,.0f} tokens/s (4 x block matmul parameters per token)")
    return "\n".join(lines)


def fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


# --------------------------------------------------------------------------------------------
# The experiment suite: each Echo method against its base method on a real model, in one lent
# window (README "Results on a real model")

EXPERIMENT_SETS = ("ARC-Easy", "ARC-Challenge", "boolq", "openbookqa")  # <data-dir>/<name>/train.json and test.json
# The experiment's departures from the recipe, made so that the runs fit a lent GPU's window;
# --train-flags and --eval-flags come after them, so they can undo them.
EXPERIMENT_TRAIN_FLAGS = ("--epochs", "1")  # the recipe trains 3 epochs
EXPERIMENT_EVAL_FLAGS = ("--num-beams", "1",  # greedy: a quarter of the protocol's 4-beam rows
                         "--batch-size", "128")  # a GPU's batch; eval.py's answers do not depend on it
# The flags the runner gives each run itself.
RUNNER_TRAIN_FLAGS = {"--ckpt", "--method", "--seed", "--data", "--out", "--resume", "--overwrite", "--precision"}
RUNNER_EVAL_FLAGS = {"--ckpt", "--adapter", "--datasets", "--data-dir", "--out", "--overwrite", "--precision",
                     "--compare"}
# A method not timed yet is estimated at the slowest timed training run times this: bench.py
# measured echo and DoRA steps at up to 1.4x our LoRA step (README "Speed and memory").
UNMEASURED_METHOD_FACTOR = 1.5
clock = time.perf_counter  # what runs are timed and sized by (the test replaces it to simulate run times)
METHOD_ORDER = ("none", "lora", "echo-lora", "dora", "echo-dora")  # "none": the untouched model


def add_experiment_flags(p):
    g = p.add_argument_group("--suite experiment", "Echo-LoRA vs LoRA and Echo-DoRA vs DoRA (--method) on a real "
                             "model, each seed a run, sized to a time budget; --out is the experiment's folder "
                             "(default results/<ckpt>-<device>-<date>), which a rerun continues")
    g.add_argument("--ckpt", default="smollm2-135m", help="the base model: checkpoints/NAME or a path (default: %(default)s)")
    g.add_argument("--data-dir", type=Path, default=Path("data"),
                   help=f"folder of <name>/train.json and test.json for {', '.join(EXPERIMENT_SETS)} (default: %(default)s)")
    g.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                   help="one run per method and seed: the seed sets the initialisation, batch order and routing "
                        "(default: 1 2 3)")
    g.add_argument("--budget-minutes", type=float, default=8.0,
                   help="start only the runs whose estimated time fits in it (0: only write the table; default: %(default)s)")
    g.add_argument("--train-flags", default="", help='more train.py flags for every run, as one string: '
                   '--train-flags="--lr 1e-3" (a rerun into the same --out must give the same; default: none)')
    g.add_argument("--echo-flags", default="",
                   help='more train.py flags for the Echo runs only, so an ablation keeps its paired base runs: '
                        '--echo-flags="--echo-route-p 1" (default: none)')
    g.add_argument("--eval-flags", default="",
                   help='more eval.py flags for every evaluation: --eval-flags="--limit 100" (default: none)')


def experiment_suite(a, p, device, precision, argv) -> dict:
    """The untouched model's evaluation, then per seed LoRA and Echo-LoRA, then per seed DoRA and
    Echo-DoRA: each trained on the four training splits and evaluated on their test sets into
    <out>/<method>-s<seed>/ (train.py's and eval.py's own files, written as they go). A run starts
    only if its estimated time fits what is left of --budget-minutes; the runs that do not fit are
    listed as skipped in <out>/experiment.json, and the same command continues them later (runs
    already evaluated are kept). Ends with <out>/results.md, eval.py's comparison of the runs."""
    started = clock()
    if not 0 <= a.budget_minutes < math.inf:
        p.error(f"--budget-minutes must be >= 0 and finite, found {a.budget_minutes}")
    if not all(0 <= seed < 2**32 for seed in a.seeds) or len(set(a.seeds)) < len(a.seeds):
        p.error(f"--seeds must be distinct and in [0, 2^32), found {' '.join(map(str, a.seeds))}")
    out = Path(a.out or f"results/{Path(a.ckpt).name}-{device_slug(device)}-{time.strftime('%Y-%m-%d')}")
    if a.budget_minutes == 0:  # only the table: nothing runs, so nothing a run needs is checked
        manifest = open_experiment(out, None)
    else:
        train_flags, echo_flags, eval_flags = experiment_flags(a, p)
        files = experiment_files(a, p)
        manifest = open_experiment(out, experiment_settings(a, precision, train_flags, echo_flags, eval_flags, files))
        call = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device_name(device),
                "torch": torch.__version__, "command": "python bench.py " + shlex.join(argv), "budget_minutes": a.budget_minutes, "runs_done": []}
        manifest["calls"].append(call)
        print(f"experiment on {call['device']}, {precision}, budget {a.budget_minutes:g} min: {out}/", flush=True)
        run_experiment(a, out, manifest, call, train_flags, echo_flags, eval_flags, precision, started)
        call["seconds"] = clock() - started
        write_json(out / "experiment.json", manifest)
    table = experiment_table(out, manifest)
    print(table)
    return manifest


def experiment_flags(a, p) -> tuple[list[str], list[str], list[str]]:
    """The train.py flags of every run, those of the Echo runs alone, and the eval.py flags: the
    experiment's, then --train-flags, --echo-flags and --eval-flags; checked by train.py's and
    eval.py's own parsers before anything runs."""
    flags = {}
    for name, fixed, runner_sets in (("train", EXPERIMENT_TRAIN_FLAGS, RUNNER_TRAIN_FLAGS),
                                     ("echo", (), RUNNER_TRAIN_FLAGS),
                                     ("eval", EXPERIMENT_EVAL_FLAGS, RUNNER_EVAL_FLAGS)):
        extra = shlex.split(getattr(a, f"{name}_flags"))
        taken = sorted({flag.split("=")[0] for flag in extra} & runner_sets)
        if taken:
            p.error(f"--{name}-flags: {', '.join(taken)} is given to each run by the experiment itself")
        flags[name] = [*fixed, *extra]
    for method in a.method:  # an echo flag in --train-flags is an error for the LoRA runs: better now than mid-experiment
        echo_flags = flags["echo"] if method.startswith("echo-") else []
        train.parse_config(["--ckpt", a.ckpt, "--method", method, *flags["train"], *echo_flags])
    evaluator.parse_args(["--ckpt", a.ckpt, *flags["eval"]])
    return flags["train"], flags["echo"], flags["eval"]


def experiment_files(a, p) -> dict[str, Path]:
    """The training splits and test sets the runs read, after checking that they and the base model are there."""
    files = {f"{name}/{split}.json": a.data_dir / name / f"{split}.json"
             for name in EXPERIMENT_SETS for split in ("train", "test")}
    missing = [key for key, path in files.items() if not path.is_file()]
    if missing:
        p.error(f"--data-dir {a.data_dir}: no {', '.join(missing)} (python data/download.py --only "
                + " ".join(f"{name} {name}-train" for name in EXPERIMENT_SETS) + " fetches them)")
    try:
        llama.resolve_checkpoint(a.ckpt)
    except FileNotFoundError as e:
        p.error(f"--ckpt {e}")
    return files


def experiment_settings(a, precision, train_flags, echo_flags, eval_flags, files) -> dict:
    """What every run in one experiment folder shares: a rerun with other settings would mix two
    experiments in one table."""
    return {"ckpt": Path(a.ckpt).name, "precision": precision, "train_flags": train_flags, "echo_flags": echo_flags,
            "eval_flags": eval_flags,
            "data_sha256": {key: hashlib.sha256(path.read_bytes()).hexdigest() for key, path in files.items()}}


def open_experiment(out: Path, settings: dict | None) -> dict:
    """The folder's experiment.json, or a new one for an empty or new folder. A folder made with
    other settings, or holding anything else, is an error: runs are continued, never mixed with
    another experiment's or written over. `settings` None: only the table is asked for."""
    file = out / "experiment.json"
    if not file.is_file():
        if settings is None:
            raise SystemExit(f"{out}: no experiment.json, so no runs to make a table of")
        if out.exists() and any(out.iterdir()):
            raise SystemExit(f"{out}: holds files but no experiment.json; give another --out")
        return {"settings": settings, "calls": [], "runs": {}}
    try:
        manifest = read_json(file)
        if not (isinstance(manifest, dict) and isinstance(manifest.get("settings"), dict)
                and isinstance(manifest.get("calls"), list) and isinstance(manifest.get("runs"), dict)):
            raise ValueError(f"{file}: not an experiment manifest (settings, calls, runs)")
        for name in manifest["runs"]:  # each run's folder, inside the experiment's
            inside(out, name, file)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if settings is not None:
        saved = manifest["settings"]
        show = lambda v: shlex.join(v) if isinstance(v, list) else v  # noqa: E731
        changed = [f"{key}: {show(saved.get(key))} -> {show(value)}" if key != "data_sha256" else
                   "data files " + ", ".join(k for k in value if saved.get(key, {}).get(k) != value[k])
                   for key, value in settings.items() if saved.get(key) != value]
        if changed:
            raise SystemExit(f"{out}: its runs were made with other settings ({'; '.join(changed)}); "
                             "give another --out for these")
    return manifest


def experiment_units(methods, seeds) -> list[list[tuple[str, int | None]]]:
    """The runs in priority order, in units that start together: the untouched model; then each
    seed's LoRA and Echo-LoRA; then each seed's DoRA and Echo-DoRA (an Echo run is compared with its
    base method's run of the same seed, so a pair starts only when both fit)."""
    units = [[("none", None)]]
    for base in ("lora", "dora"):
        for seed in seeds:
            unit = [(method, seed) for method in (base, f"echo-{base}") if method in methods]
            if unit:
                units.append(unit)
    return units


def run_name(method: str, seed: int | None) -> str:
    return method if seed is None else f"{method}-s{seed}"


def evaluated(folder: Path) -> bool:
    return (folder / "results.json").is_file() and (folder / "predictions.jsonl").is_file()


def estimate_seconds(method: str, runs: dict) -> float | None:
    """A run's expected seconds from the runs timed so far, in this call or an earlier one: the
    mean of its method's runs; for a method not timed yet, the slowest timed training run times
    UNMEASURED_METHOD_FACTOR; for the untouched model, the mean evaluation. None: nothing timed."""
    evaluations = [r["eval_seconds"] for r in runs.values() if r.get("eval_seconds") is not None]
    if method == "none":
        return statistics.mean(evaluations) if evaluations else None
    timed = [(r["method"], r["train_seconds"] + r["eval_seconds"]) for r in runs.values()
             if r.get("train_seconds") is not None and r.get("eval_seconds") is not None]
    same = [seconds for m, seconds in timed if m == method]
    if same:
        return statistics.mean(same)
    return max(seconds for _, seconds in timed) * UNMEASURED_METHOD_FACTOR if timed else None


def fits(estimates: list[float | None], seconds_left: float) -> bool:
    """Whether runs of these estimated times fit. An unknown time counts as 0: with nothing timed
    yet the first run starts, and its time sizes the rest."""
    return seconds_left > 0 and sum(e for e in estimates if e is not None) <= seconds_left


def run_experiment(a, out, manifest, call, train_flags, echo_flags, eval_flags, precision, started):
    """Every unit of experiment_units in order, each run only if it fits the budget; from the first
    that does not, every later one is skipped too (the priority order stays the order of results).
    experiment.json is rewritten as each run starts and ends (the caller writes it once more at the end)."""
    runs, budget = manifest["runs"], 60 * a.budget_minutes
    over_budget = False
    for unit in experiment_units(a.method, a.seeds):
        todo = [(method, seed) for method, seed in unit if not evaluated(out / run_name(method, seed))]
        for method, seed in unit:
            if (method, seed) not in todo:  # evaluated in an earlier call: kept as it is
                runs.setdefault(run_name(method, seed), {"method": method, "seed": seed})["status"] = "done"
        for i, (method, seed) in enumerate(todo):
            name, left = run_name(method, seed), budget - (clock() - started)
            estimates = [estimate_seconds(m, runs) for m, _ in (todo if i == 0 else todo[i:i + 1])]
            if over_budget or not fits(estimates, left):
                over_budget = True
                runs[name] = {"method": method, "seed": seed, "status": "skipped",
                              "estimate_seconds": estimate_seconds(method, runs), "seconds_left": max(left, 0.0)}
                print(f"skipped {name}: estimated {fmt(runs[name]['estimate_seconds'], '.0f', ' s')}, "
                      f"{max(left, 0.0):.0f} s of the budget left", flush=True)
                continue
            runs[name] = {"method": method, "seed": seed, "status": "running", "call": len(manifest["calls"]) - 1}
            write_json(out / "experiment.json", manifest)
            flags = train_flags + echo_flags if method.startswith("echo-") else train_flags
            runs[name] |= train_and_evaluate(a, out / name, method, seed, flags, eval_flags, precision)
            runs[name]["status"] = "done"
            call["runs_done"].append(name)
            write_json(out / "experiment.json", manifest)


def train_and_evaluate(a, folder: Path, method, seed, train_flags, eval_flags, precision) -> dict:
    """One run: train.py (the untouched model has nothing to train), then eval.py, into `folder`;
    the seconds of each part. A run cut short in an earlier call continues from its checkpoint;
    one cut short before its first checkpoint holds nothing finished and starts again."""
    timing = {}
    if method != "none":
        resume = (folder / "checkpoint.pt").is_file()
        again = ["--resume"] if resume else ["--overwrite"] if train.holds_run(folder) else []
        data = ",".join(str(a.data_dir / name / "train.json") for name in EXPERIMENT_SETS)
        t0 = clock()
        train.main(["--ckpt", a.ckpt, "--method", method, "--seed", str(seed), "--data", data, "--out", str(folder),
                    "--precision", precision, *train_flags, *again])
        # a resumed run's time is part of a run's: no estimate of a whole one
        timing |= {"train_seconds": None if resume else clock() - t0, "resumed": resume}
    adapter = [] if method == "none" else ["--adapter", str(folder)]
    again = ["--overwrite"] if (folder / "results.json").is_file() else []  # cut short before predictions.jsonl
    t0 = clock()
    if evaluator.main(["--ckpt", a.ckpt, *adapter, "--data-dir", str(a.data_dir), "--datasets", *EXPERIMENT_SETS,
                       "--out", str(folder), "--precision", precision, *eval_flags, *again]):
        raise SystemExit(1)  # eval.py has printed its one-line error
    timing["eval_seconds"] = clock() - t0
    gc.collect()  # the run's model is gone before the next one's is loaded
    return timing


def experiment_table(out: Path, manifest: dict) -> str:
    """<out>/results.md: how the runs were made, then `eval.py --compare` of every evaluated run."""
    names = sorted((name for name in manifest["runs"] if evaluated(out / name)),
                   key=lambda n: (METHOD_ORDER.index(manifest["runs"][n]["method"]), manifest["runs"][n]["seed"] or 0))
    if not names:
        return f"{out}: no run has been evaluated yet, so there is no table"
    try:
        comparison = evaluator.compare_runs([out / name for name in names])
        configs = {name: read_json(out / name / "config.json") for name in names
                   if manifest["runs"][name]["method"] != "none"}
    except (OSError, ValueError) as e:
        raise SystemExit(f"bench.py: {e}") from None
    settings = manifest["settings"]
    lines = [f"# Echo vs its base method on {settings['ckpt']}", "",
             "Made by `bench.py --suite experiment` from the run folders beside this file; nothing typed by hand.", ""]
    for call in manifest["calls"]:
        lines.append(f"- {call['started']}, {call['device']} (torch {call['torch']}), "
                     f"budget {call['budget_minutes']:g} min: {len(call['runs_done'])} runs in "
                     f"{fmt(call.get('seconds'), '.0f', ' s')}: `{call['command']}`")
    lrs = sorted({(c["config"]["method"], c["config"]["lr"]) for c in configs.values()},
                 key=lambda m_lr: METHOD_ORDER.index(m_lr[0]))
    first = next(iter(configs.values()), None)
    lines.append(f"- training: train.py, {settings['precision']}, `{shlex.join(settings['train_flags'])}` (the recipe: "
                 f"3 epochs) on the training splits of {', '.join(EXPERIMENT_SETS)}"
                 + (f" ({first['train_records']} records, {first['config']['val_size']} more for validation, the "
                    f"same for every seed)" if first else "")
                 + ("; lr " + ", ".join(f"{m} {lr:g}" for m, lr in lrs) if lrs else "")
                 + (f"; the Echo runs also `{shlex.join(settings['echo_flags'])}`" if settings.get("echo_flags") else ""))
    lines.append(f"- evaluation: eval.py, `{shlex.join(settings['eval_flags'])}` (the protocol: 4 beams) "
                 "on the matching test sets")
    skipped = [name for name, r in manifest["runs"].items() if not evaluated(out / name)]
    if skipped:
        lines.append(f"- not run yet (over the budget, or cut short): {', '.join(skipped)}")
    table = "\n".join(lines) + "\n\n" + comparison
    write_atomically(out / "results.md", lambda tmp: tmp.write_text(table, encoding="utf-8"))
    return table


if __name__ == "__main__":
    main()
