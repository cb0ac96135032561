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
Prints one table and writes bench.json.
"""

import argparse
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import llama
from data.commonsense import IGNORE_INDEX, load_records
from echo_lora import EchoConfig, EchoPath, add_adapters, loss_terms, route, trainable_parameters
from train import autocast, collate, encode_examples, length_grouped_batches

SHAPES = {
    "llama-7b": llama.ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
    "llama2-7b": llama.ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, max_seq_len=4096),
    "llama3-8b": llama.ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                                 multiple_of=1024, ffn_dim_multiplier=1.3, rope_theta=500000.0),
    "tiny": llama.ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=32),
}
TARGETS = ("wq", "wk", "wv", "w3", "w2")
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
RECIPE_RECORDS, RECIPE_EPOCHS = 170_420, 3
BENCHMARK_QUESTIONS = 22_420  # the eight commonsense test sets together
ANSWER_TOKENS = 8  # the fixed workload's "answer": about what a recipe record's answer is


class Timer:
    """Wall time of a region: CUDA events on the GPU (they time the device, not the launch
    queue), perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    @contextmanager
    def region(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            torch.cuda.synchronize()
            self.seconds = start.elapsed_time(end) / 1000
        else:
            t0 = time.perf_counter()
            yield
            self.seconds = time.perf_counter() - t0


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


def data_workloads(path, tokenizer, batch_size, cutoff, n_batches):
    """(ours, upstream's) batches over the same records: length-grouped vs random and padded."""
    examples = encode_examples(load_records(path), tokenizer, cutoff)
    if not examples:
        raise ValueError(f"{path}: holds no records")
    lengths = [len(ids) for ids, _ in examples]
    ours = length_grouped_batches(lengths, batch_size, seed=0)[:n_batches]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0)).tolist()
    theirs = [order[i:i + batch_size] for i in range(0, len(order), batch_size)][:n_batches]
    mean_tokens = sum(lengths) / len(lengths)
    return [[examples[i] for i in b] for b in ours], [[examples[i] for i in b] for b in theirs], mean_tokens


# --------------------------------------------------------------------------------------------
# Training steps


def our_step_fn(model, method, echo_pass, device, route_p):
    """One optimiser step of train.py (forward, backward, AdamW) on one batch of examples."""
    add_adapters(model, TARGETS, r=32, alpha=64, dropout=0.05, dora="dora" in method)
    echo = EchoPath(model, EchoConfig(route_p=route_p, echo_pass=echo_pass)).to(device) \
        if method.startswith("echo") else None
    params = trainable_parameters(model) + (list(echo.parameters()) if echo else [])
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()

    def step(examples):
        batch = collate(examples, False, 0).to(device)
        routed = route(len(examples), route_p, g).to(device)
        with autocast(device):
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


def peft_step_fn(args, method, device, dtype):
    """The same step through LlamaForCausalLM + get_peft_model, batches padded with a mask."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf_random_model(args, device, dtype), LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=HF_TARGETS,
                                          use_dora=method == "dora", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    model.train()

    def step(examples):
        T = max(len(ids) for ids, _ in examples)
        ids = torch.tensor([e[0] + [0] * (T - len(e[0])) for e in examples], device=device)
        mask = torch.tensor([[1] * len(e[0]) + [0] * (T - len(e[0])) for e in examples], device=device)
        labels = torch.tensor([e[1] + [IGNORE_INDEX] * (T - len(e[1])) for e in examples], device=device)
        with autocast(device):
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


def matmul_tflops(device, dtype, n=8192 if torch.cuda.is_available() else 1024, reps=10):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    timer = Timer(device)
    with timer.region():
        for _ in range(reps):
            a @ b
    return 2 * n ** 3 * reps / timer.seconds / 1e12


def lora_ceiling_tokens_per_s(args, tflops):
    """4 FLOPs per block matmul parameter per token: forward (2) and input gradients (2); the
    frozen weights need no weight gradients. Attention scores and the adapters are left out, and
    so is the output head, which our step applies only at the labelled positions."""
    with torch.device("meta"):
        model = llama.Transformer(args)
    n = sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, torch.nn.Linear))
    return tflops * 1e12 / (4 * n)


# --------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="tiny", choices=SHAPES)
    p.add_argument("--method", nargs="+", default=["lora", "dora", "echo-lora", "echo-dora"],
                   choices=["lora", "dora", "echo-lora", "echo-dora"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration (after warm-up)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--route-p", type=float, default=0.5)
    p.add_argument("--data", help="commonsense JSON: also time the real-record workload")
    p.add_argument("--tokenizer", help="tokenizer.model for --data and --test-sets (its vocabulary must fit the shape)")
    p.add_argument("--test-sets", type=Path, help="folder of <benchmark>/test.json: time eval.py's decoding on them")
    p.add_argument("--questions-per-set", type=int, default=64)
    p.add_argument("--no-peft", action="store_true", help="skip the transformers + peft peer")
    p.add_argument("--out", default="bench.json")
    a = p.parse_args(argv)
    for flag, ok, allowed in (("batch_size", a.batch_size >= 1, ">= 1"), ("steps", a.steps >= 1, ">= 1"),
                              ("seq_len", ANSWER_TOKENS < a.seq_len <= 2 * SHAPES[a.shape].max_seq_len,
                               f"in ({ANSWER_TOKENS}, {2 * SHAPES[a.shape].max_seq_len}]"),
                              ("warmup", a.warmup >= 0, ">= 0"), ("route_p", 0 <= a.route_p <= 1, "in [0, 1]"),
                              ("questions_per_set", a.questions_per_set >= 1, ">= 1")):
        if not ok:  # a bad value is one line here, not a traceback (or a division by zero) later
            p.error(f"--{flag.replace('_', '-')} must be {allowed}, found {getattr(a, flag)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = SHAPES[a.shape]
    with_peft = not a.no_peft and peft_available()

    workloads = {"fixed 16x256": (fixed_workload(args, a.batch_size, a.seq_len, a.warmup + a.steps),) * 2}
    mean_tokens = tokenizer = None
    if a.data or a.test_sets:
        if not a.tokenizer:
            p.error("--data and --test-sets need --tokenizer")
        if not Path(a.tokenizer).is_file():
            p.error(f"--tokenizer {a.tokenizer}: no such file")
        tokenizer = llama.Tokenizer(a.tokenizer)
        if tokenizer.n_words > args.vocab_size:
            p.error(f"{a.tokenizer}: {tokenizer.n_words} tokens do not fit the {a.shape} shape's {args.vocab_size}")
    if a.data:
        try:
            ours, theirs, mean_tokens = data_workloads(a.data, tokenizer, a.batch_size, 256, a.warmup + a.steps)
        except (OSError, ValueError) as e:
            p.error(f"--data {e}")
        workloads["real records"] = (ours, theirs)

    rows = []
    for workload, (ours, theirs) in workloads.items():
        for method in a.method:
            passes = ("suffix", "full") if method.startswith("echo") else ("-",)
            for echo_pass in passes:
                model = random_model(args, device, dtype)
                step = our_step_fn(model, method, echo_pass if echo_pass != "-" else "suffix", device, a.route_p)
                rows.append({"workload": workload, "impl": "ours", "method": method, "echo_pass": echo_pass,
                             **time_steps(step, ours, a.warmup, device)})
                del model, step
            if with_peft and method in ("lora", "dora"):
                step = peft_step_fn(args, method, device, dtype)
                rows.append({"workload": workload, "impl": "peft", "method": method, "echo_pass": "-",
                             **time_steps(step, theirs, a.warmup, device)})
                del step
    add_ratios(rows)

    prompts = decode_prompts(args, 32, 120)
    model = random_model(args, device, dtype)
    decode = {"ours": time_our_decode(model, prompts, 32, device)}
    evaluation = time_evaluation(model, tokenizer, a.test_sets, a.questions_per_set, device) if a.test_sets else None
    del model
    if with_peft:
        decode["transformers"] = time_hf_decode(args, prompts, 32, device, dtype)
    tflops = matmul_tflops(device, dtype)
    ceiling = lora_ceiling_tokens_per_s(args, tflops)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "shape": a.shape, "dtype": str(dtype), "train": rows, "decode": decode, "evaluation": evaluation,
              "matmul_tflops": tflops, "lora_ceiling_tokens_per_s": ceiling, "mean_record_tokens": mean_tokens}
    print(format_table(result, mean_tokens))
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, a.out)
    return result


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
             "| workload | impl | method | echo pass | tokens/s | step ms | peak GiB | vs peft | step / own base | recipe hours |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["train"]:
        hours = (RECIPE_EPOCHS * RECIPE_RECORDS * mean_tokens / r["tokens_per_s"] / 3600
                 if mean_tokens and r["workload"] == "real records" else None)
        cells = [r["workload"], r["impl"], r["method"], r["echo_pass"], f"{r['tokens_per_s']:,.0f}",
                 f"{1000 * r['step_s']:.1f}", fmt(r["peak_gib"], ".1f"), fmt(r.get("vs_peft"), ".2f", "x"),
                 fmt(r.get("step_vs_own_base"), ".2f", "x"), fmt(hours, ".2f")]
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


if __name__ == "__main__":
    main()
