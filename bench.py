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
The correctness checks against transformers and peft, and the torchrun smoke run, are
scripts/device_check.py's.
"""

import argparse
import gc
import json
from contextlib import contextmanager
from pathlib import Path

import torch

import llama
from data.commonsense import IGNORE_INDEX, load_records
from data.files import write_atomically
from echo_lora import (DEFAULT_TARGETS, TARGET_HF_NAMES, EchoConfig, EchoPath, add_adapters, loss_terms, route,
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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="tiny", help="the model's shape, random weights (default: tiny)")
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
                                    "(default: none)")
    p.add_argument("--tokenizer", help="tokenizer.model for --data and --test-sets (its vocabulary must fit the shape) "
                                         "(default: none)")
    p.add_argument("--test-sets", type=Path, help="folder of <benchmark>/test.json: time eval.py's decoding on them "
                                                    "(default: none)")
    p.add_argument("--questions-per-set", type=int, default=64, help="test prompts timed per benchmark (default: 64)")
    p.add_argument("--no-peft", action="store_true",
                   help="skip the transformers + peft peer (default: time it, when installed)")
    p.add_argument("--out", default="bench.json", help="the result file, and its table beside it as .md "
                                                        "(default: %(default)s)")
    a = p.parse_args(argv)
    for flag, ok, allowed in (("batch_size", a.batch_size >= 1, ">= 1"), ("steps", a.steps >= 1, ">= 1"),
                              ("seq_len", ANSWER_TOKENS < a.seq_len <= 2 * SHAPES[a.shape].max_seq_len,
                               f"in ({ANSWER_TOKENS}, {2 * SHAPES[a.shape].max_seq_len}]"),
                              ("warmup", a.warmup >= 0, ">= 0"), ("route_p", 0 <= a.route_p <= 1, "in [0, 1]"),
                              ("questions_per_set", a.questions_per_set >= 1, ">= 1")):
        if not ok:  # a bad value is one line here, not a traceback (or a division by zero) later
            p.error(f"--{flag.replace('_', '-')} must be {allowed}, found {getattr(a, flag)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = a.precision or llama.default_precision(device)
    return measure_speed(a, p, device, precision, Path(a.out))


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


if __name__ == "__main__":
    main()
