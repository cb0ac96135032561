"""Speed and memory of our training step and evaluation, beside transformers + peft on the same work.

    python bench.py --ckpt smollm2-135m --precision bf16     # a real model (data/prepare_smollm2.py)
    python bench.py --shape llama-7b                         # random weights of a named shape (a GPU)
    python bench.py --shape tiny --steps 1 --warmup 1        # a smoke run (tests/test_bench.py)

Training: the recipe's random batches of real records; our step is train.py's (accumulate_gradients,
clipping, AdamW), the peer LlamaForCausalLM + peft on the same batches under the same precision.
Each row: real tokens/s, peak memory (CUDA), ours over peft's, an Echo step over its base method's
(the two alternating on one model),
and the fraction of the LoRA ceiling: 4N FLOP per real token (N the block linears and the head) at
the matmul rate measured in the same run, and of the real-shape limit (the same frozen matmuls at
the step's own rows). Evaluation: eval.py's greedy decoding beside transformers' `generate` (with
--cloze: cloze scoring beside one transformers forward per question), in questions/s. Writes
bench.json after every row, and bench.md (the table) at the end.
"""

import argparse
import contextlib
import gc
import json
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import eval as evaluator
import llama
import train
from data import batches, checkpoints
from data.commonsense import IGNORE_INDEX, cloze_choices, cloze_prompt, load_records
from data.files import write_atomically
from data.tokenizer import Tokenizer
from echo_lora import EchoConfig, EchoPath, add_adapters
from scripts import convert_hf
from scripts.convert_peft import TARGET_HF_NAMES

ASSETS = Path(__file__).resolve().parent / "tests" / "assets"  # committed real files: records, tokenizers, tests
TRAIN_SPLITS = ("ARC-Easy", "ARC-Challenge", "boolq", "openbookqa")
DEFAULT_DATA = ",".join(str(ASSETS / "data" / "commonsense" / s / "train.json") for s in TRAIN_SPLITS)
DEFAULT_TOKENIZER = ASSETS / "models" / "llama2-tokenizer" / "tokenizer.model"  # for the 32000-word shapes
METHODS = ("lora", "dora", "echo-lora", "echo-dora")


# --------------------------------------------------------------------------------------------
# Timing and the ceiling


@contextmanager
def timed(device, seconds: list):
    """Appends the wall time of the block to `seconds` (CUDA synchronised before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds.append(time.perf_counter() - start)


def matmul_tflops(device, dtype, reps: int = 10) -> float:
    """The measured rate of a square matmul (8192 on CUDA, 2048 on a CPU), TFLOP/s."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    seconds = []
    with timed(device, seconds):
        for _ in range(reps):
            a @ b
    return 2 * n ** 3 * reps / seconds[0] / 1e12


def ceiling_tokens_per_s(args: llama.ModelArgs, tflops: float) -> float:
    """Real tokens/s at 4N FLOP per token, N = the block linears and the output head (which the
    whole-text loss applies at every position)."""
    with torch.device("meta"):
        model = llama.Transformer(args)
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return tflops * 1e12 / (4 * n)


def real_shape_limit(args: llama.ModelArgs, step_batches: list[list], device, dtype, answer_only: bool,
                     reps: int = 3) -> float:
    """Real tokens/s if a step were only its frozen matmuls at the shapes it runs: per length-sorted
    part (padding included) each block linear's x W^T and g W, and the head on the rows a loss is
    taken at. What a row's fraction of this leaves out: attention, norms, adapters, the optimizer."""
    shapes = [(args.dim, args.n_heads * args.head_dim), (args.dim, args.kv_heads * args.head_dim),
              (args.dim, args.kv_heads * args.head_dim), (args.n_heads * args.head_dim, args.dim),
              (args.dim, args.hidden_dim), (args.dim, args.hidden_dim), (args.hidden_dim, args.dim)]
    measured = {}

    def seconds(rows: int, n_in: int, n_out: int) -> float:
        """The time of one forward and one input-gradient matmul of `rows` rows, min over reps."""
        if (rows, n_in, n_out) not in measured:
            x = torch.randn(rows, n_in, device=device, dtype=dtype)
            g = torch.randn(rows, n_out, device=device, dtype=dtype)
            w = torch.randn(n_out, n_in, device=device, dtype=dtype)
            times = []
            for _ in range(reps + 1):  # the first is a warm-up
                with timed(device, times):
                    torch.nn.functional.linear(x, w)
                    g @ w
            measured[rows, n_in, n_out] = min(times[1:])
        return measured[rows, n_in, n_out]

    total, tokens = 0.0, 0
    for examples in step_batches:
        lengths = [len(ids) for ids, _ in examples]
        head_rows = [sum(y != IGNORE_INDEX for y in labels) if answer_only else len(ids) - 1 for ids, labels in examples]
        for part in batches.padded_parts(lengths):
            rows = len(part) * max(lengths[i] for i in part)
            total += args.n_layers * sum(seconds(rows, n_in, n_out) for n_in, n_out in shapes)
            total += seconds(sum(head_rows[i] for i in part), args.dim, args.vocab_size)
            tokens += sum(lengths[i] for i in part)
    return tokens / total


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device):
    gc.collect()  # the last configuration's model must be gone before this one's is measured
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# --------------------------------------------------------------------------------------------
# The models: the same weights on both sides


def model_folders(a, scratch: Path) -> tuple[Path, Path | None]:
    """The Meta-layout folder we load and the HF-layout folder the peer loads (None with --no-peft):
    --ckpt and --hf (default: --ckpt's hf/), or random weights of --shape converted in `scratch`."""
    if a.ckpt:
        ours = checkpoints.resolve_checkpoint(a.ckpt)
        peer = a.hf or ours / "hf"
        if not a.no_peft and not (peer / "config.json").is_file():
            raise ValueError(f"the peer needs an HF-layout folder (config.json) of --ckpt {a.ckpt}'s "
                             f"weights: {peer} is none; give it with --hf, or pass --no-peft")
        return ours, None if a.no_peft else peer
    convert_hf.hf_random_model(llama.SHAPES[a.shape], "cpu", torch.float32).save_pretrained(scratch / "hf")
    return convert_hf.convert(scratch / "hf", scratch / "meta"), scratch / "hf"


def our_model(folder: Path, device, dtype, tokenizer_file: Path | None):
    model, tokenizer = llama.load(folder, device, dtype)
    return model, tokenizer or Tokenizer(tokenizer_file)


def peft_model(folder: Path, method: str, device, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    config = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, use_dora=method == "dora", task_type="CAUSAL_LM",
                        target_modules=[TARGET_HF_NAMES[t] for t in train.Config().targets.split(",")])
    return get_peft_model(hf, config)


# --------------------------------------------------------------------------------------------
# Training steps


def recipe_batches(records: list[dict], tokenizer, batch_size: int, n: int, cloze: bool) -> list[list]:
    """The first n batches of the recipe's epoch 0 (random order, cutoff 256), as examples: the
    protocol's prompts, or with `cloze` the cloze form (train.py --cloze)."""
    examples = batches.encode_examples(records, tokenizer, 256, cloze)
    return [[examples[i] for i in b] for b in batches.random_batches(len(examples), batch_size, seed=0)[:n]]


def our_step(model, tokenizer, method: str, device, precision: str, batch_size: int, answer_only: bool):
    """train.py's step: accumulate_gradients (length-sorted parts, the Echo path for echo- methods),
    clipping, AdamW. Returns a function of one batch's examples -> real tokens computed (with_echo
    False: the base method's step on the same model, for an Echo method's paired timing)."""
    cfg = train.Config(method=method, precision=precision, batch_size=batch_size, micro_batch_size=batch_size,
                       answer_only_loss=answer_only)
    torch.manual_seed(0)
    add_adapters(model, tuple(cfg.targets.split(",")), cfg.r, cfg.alpha, cfg.dropout, dora="dora" in method)
    echo = EchoPath(model, EchoConfig()).to(device) if method.startswith("echo") else None
    model.train()
    groups = train.parameter_groups(model, echo)
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=1e-5, weight_decay=0.0)
    step = iter(range(10**9))

    def run(examples, with_echo: bool = True) -> int:
        routed = train.routed_samples(len(examples), EchoConfig().route_p, 0, next(step))
        _, tokens = train.accumulate_gradients(model, echo if with_echo else None, examples, routed, cfg,
                                               tokenizer.pad_id, device, 1, 0)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return tokens
    return run


def peft_step(model, device, precision: str, answer_only: bool):
    """The same step through peft: each batch padded to its longest, labels the real tokens (the
    whole-text loss; transformers shifts them) or with `answer_only` the answer's, the mean over
    the batch's labelled tokens."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    model.train()

    def run(examples) -> int:
        T = max(len(ids) for ids, _ in examples)
        ids = torch.tensor([e + [0] * (T - len(e)) for e, _ in examples], device=device)
        mask = torch.tensor([[1] * len(e) + [0] * (T - len(e)) for e, _ in examples], device=device)
        labels = (torch.tensor([y + [IGNORE_INDEX] * (T - len(y)) for _, y in examples], device=device)
                  if answer_only else torch.where(mask.bool(), ids, IGNORE_INDEX))
        with checkpoints.autocast(device, precision):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(mask.sum())
    return run


def time_base_step(step, examples, device, seconds: list):
    with timed(device, seconds):
        step(examples, with_echo=False)


def time_training(step, batches, warmup: int, device, profile: bool = False, paired: bool = False) -> dict:
    """Real tokens/s over the batches after `warmup` of them, and the median step time; with `profile`
    the operators that took the most of those steps' time (torch.profiler's self time, seconds). With
    `paired` (an Echo method) each batch also runs the base method's step on the same model, before or
    after by turns, and `step_vs_base` is the ratio of their summed times: both measured in the same
    moments, as a CPU's speed drifts between rows timed one after the other."""
    for examples in batches[:warmup]:
        step(examples)
    reset_peak(device)
    seconds, base_seconds, tokens = [], [], 0
    with torch.profiler.profile() if profile else contextlib.nullcontext() as profiler:
        for i, examples in enumerate(batches[warmup:]):
            base_first = paired and i % 2 == 0  # by turns, so neither side always runs on a warmed cache
            if base_first:
                time_base_step(step, examples, device, base_seconds)
            with timed(device, seconds):
                tokens += step(examples)
            if paired and not base_first:
                time_base_step(step, examples, device, base_seconds)
    row = {"tokens_per_s": tokens / sum(seconds), "step_s": statistics.median(seconds), "peak_gib": peak_gib(device)}
    if paired:
        row["step_vs_base"] = sum(seconds) / sum(base_seconds)
    if profile:
        ops = sorted(profiler.key_averages(), key=lambda op: -op.self_device_time_total - op.self_cpu_time_total)
        row["profile_s"] = {op.key: (op.self_cpu_time_total + op.self_device_time_total) / 1e6 for op in ops[:8]}
    return row


# --------------------------------------------------------------------------------------------
# Evaluation decoding


def test_prompts(test_dir: Path, per_set: int) -> dict[str, list[dict]]:
    """The first `per_set` records of each benchmark's test.json found under test_dir."""
    return {name: load_records(test_dir / name / "test.json")[:per_set]
            for name in evaluator.BENCHMARKS if (test_dir / name / "test.json").is_file()}


def time_our_evaluation(model, tokenizer, test_sets, batch_size: int, max_new_tokens: int, device) -> dict:
    """eval.py's greedy decoding of the test prompts: questions/s, and the replies."""
    model.eval()
    seconds, replies = [], {}
    with timed(device, seconds):
        for name, records in test_sets.items():
            replies[name] = [p["generated"] for p in evaluator.evaluate(
                model, tokenizer, name, records, batch_size, num_beams=1, max_new_tokens=max_new_tokens)]
    return {"questions_per_s": sum(map(len, test_sets.values())) / seconds[0], "seconds": seconds[0]}, replies


def time_hf_evaluation(folder: Path, tokenizer, test_sets, batch_size: int, max_new_tokens: int, device,
                       dtype) -> dict:
    """transformers' greedy `generate` on the same prompts, batched and ordered as eval.py does."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    seconds = []
    with timed(device, seconds), torch.no_grad():
        for records in test_sets.values():
            prompts = sorted((tokenizer.encode(evaluator.eval_prompt(r), bos=True, eos=False) for r in records),
                             key=len, reverse=True)
            for start in range(0, len(prompts), batch_size):
                ids, valid = evaluator.left_pad(prompts[start:start + batch_size], tokenizer.pad_id, device)
                hf.generate(input_ids=ids, attention_mask=valid.long(), max_new_tokens=max_new_tokens,
                            do_sample=False, eos_token_id=sorted(tokenizer.stop_ids), pad_token_id=tokenizer.pad_id)
    return {"questions_per_s": sum(map(len, test_sets.values())) / seconds[0], "seconds": seconds[0]}


def time_our_cloze_scoring(model, tokenizer, test_sets, device) -> tuple[dict, dict]:
    """eval.py --scoring cloze on the test questions: questions/s, and the answers."""
    model.eval()
    seconds, answers = [], {}
    with timed(device, seconds):
        for name, records in test_sets.items():
            answers[name] = [p["answer"] for p in evaluator.rank_by_likelihood(model, tokenizer, name, records, "cloze")]
    return {"questions_per_s": sum(map(len, test_sets.values())) / seconds[0], "seconds": seconds[0]}, answers


def time_hf_cloze_scoring(folder: Path, tokenizer, test_sets, device, dtype) -> tuple[dict, dict]:
    """The same ranking by LlamaForCausalLM, the usual way: one forward over each question's choices,
    every prompt + choice computed whole, right-padded. Questions/s, and the answers."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    seconds, answers = [], {}
    with timed(device, seconds), torch.no_grad():
        for name, records in test_sets.items():
            answers[name] = []
            for record in records:
                question, choices, labels = cloze_choices(record)
                prompt = cloze_prompt(question)
                n_prompt = len(tokenizer.encode(prompt, bos=True, eos=False))
                texts = [tokenizer.encode(f"{prompt} {c}", bos=True, eos=False) for c in choices]
                width = max(map(len, texts))
                ids = torch.tensor([t + [tokenizer.pad_id] * (width - len(t)) for t in texts], device=device)
                valid = torch.tensor([[i < len(t) for i in range(width)] for t in texts], device=device)
                logprobs = torch.log_softmax(hf(input_ids=ids, attention_mask=valid.long()).logits.float(), -1)
                per_byte = [sum(logprobs[row, i - 1, t[i]].item() for i in range(n_prompt, len(t))) / len(c.encode())
                            for row, (t, c) in enumerate(zip(texts, choices))]
                answers[name].append(labels[per_byte.index(max(per_byte))])
    return {"questions_per_s": sum(map(len, test_sets.values())) / seconds[0], "seconds": seconds[0]}, answers


# --------------------------------------------------------------------------------------------


def parser_error(message: str):
    """A bad input found after parsing, reported as argparse reports its own: one line, exit 2."""
    argparse.ArgumentParser(prog="bench.py").error(message)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--ckpt", help="a Meta-layout checkpoint folder (checkpoints/NAME or a path); default: --shape")
    p.add_argument("--hf", type=Path, help="the HF-layout folder of --ckpt's weights, for the peer (default: "
                                           "--ckpt's hf/, where data/prepare_smollm2.py writes it)")
    p.add_argument("--shape", choices=llama.SHAPES, default="tiny",
                   help="random weights of this shape when no --ckpt is given (default: tiny)")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                   help="tokenizer for a --shape (default: the LLaMA-2 one in tests/assets)")
    p.add_argument("--method", nargs="+", default=list(METHODS), choices=METHODS, help="the methods timed (default: all)")
    p.add_argument("--precision", choices=list(checkpoints.PRECISIONS),
                   help="bf16: the recipe's autocast; fp32 (default: bf16 on cuda, fp32 elsewhere)")
    p.add_argument("--data", default=DEFAULT_DATA, help="training records, comma-separated JSON files "
                                                        "(default: the four training splits in tests/assets)")
    p.add_argument("--cloze", action="store_true",
                   help="time the cloze form with the answer-only loss (train.py --cloze --answer-only-loss) "
                        "and eval.py --scoring cloze, instead of the recipe's prompts, whole-text loss and "
                        "greedy decoding (default: the recipe's)")
    p.add_argument("--batch-size", type=int, default=16, help="records per training step (default: 16)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per configuration (default: 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (default: 2)")
    p.add_argument("--test-sets", type=Path, default=ASSETS / "data" / "commonsense",
                   help="folder of <benchmark>/test.json for the evaluation rows (default: tests/assets')")
    p.add_argument("--questions", type=int, default=64, help="test prompts timed per benchmark (default: 64)")
    p.add_argument("--eval-sets", nargs="+", default=["ARC-Easy"], metavar="NAME",
                   help="benchmarks whose prompts are timed (default: ARC-Easy)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="the longest reply (default: 32, the protocol's)")
    p.add_argument("--profile", action="store_true", help="list each training row's 8 costliest operators "
                   "(torch.profiler; the rows' speeds then include its overhead) (default: off)")
    p.add_argument("--no-peft", action="store_true", help="skip the transformers + peft peer (default: time it)")
    p.add_argument("--out", type=Path, default=Path("bench.json"), help="the JSON written (default: bench.json)")
    a = p.parse_args(argv)
    for name in ("batch_size", "steps", "questions", "max_new_tokens"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, found {getattr(a, name)}")
    if a.warmup < 0:
        p.error(f"--warmup must be >= 0, found {a.warmup}")
    return a


def main(argv=None) -> dict:
    a = parse_args(argv)
    device, precision = checkpoints.device_and_precision(None, a.precision)
    dtype = checkpoints.PRECISIONS[precision]
    if not a.ckpt and not a.tokenizer.is_file():  # bad input is one line before any model is built
        parser_error(f"--tokenizer {a.tokenizer}: no such file")
    try:
        records = [r for path in a.data.split(",") for r in load_records(path)]
    except (OSError, ValueError) as e:
        parser_error(f"--data {e}")
    with tempfile.TemporaryDirectory() as scratch:
        try:
            folder, peer = model_folders(a, Path(scratch))
        except ValueError as e:
            raise SystemExit(f"bench.py: {e}") from None
        model, tokenizer = our_model(folder, device, dtype, a.tokenizer)
        args = model.args
        del model
        step_batches = recipe_batches(records, tokenizer, a.batch_size, a.warmup + a.steps, a.cloze)
        tflops = matmul_tflops(device, dtype)  # the run's own precision: a CPU may lack fast bf16
        result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "torch": torch.__version__, "model": a.ckpt or f"{a.shape} (random weights)",
                  "precision": precision, "form": "cloze, answer-only loss" if a.cloze else "the recipe's",
                  "threads": torch.get_num_threads(), "matmul_tflops": tflops,
                  "ceiling_tokens_per_s": ceiling_tokens_per_s(args, tflops),
                  "real_shape_limit_tokens_per_s": real_shape_limit(args, step_batches[a.warmup:], device, dtype, a.cloze),
                  "train": [], "evaluation": {},
                  "date": time.strftime("%Y-%m-%d")}

        def write(row=None):
            if row is not None:
                result["train"].append(row)
            add_ratios(result)
            write_atomically(a.out, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))

        for method in a.method:
            model, _ = our_model(folder, device, dtype, a.tokenizer)
            step = our_step(model, tokenizer, method, device, precision, a.batch_size, a.cloze)
            write({"impl": "ours", "method": method} | time_training(step, step_batches, a.warmup, device, a.profile,
                                                                     paired=method.startswith("echo-")))
            del model, step  # the step holds the model: freed before the next is measured
            if not a.no_peft and method in ("lora", "dora"):
                step = peft_step(peft_model(peer, method, device, dtype), device, precision, a.cloze)
                write({"impl": "peft", "method": method} | time_training(step, step_batches, a.warmup, device, a.profile))
                del step

        test_sets = {k: v for k, v in test_prompts(a.test_sets, a.questions).items() if k in a.eval_sets}
        evaluation = result["evaluation"]
        evaluation["scoring"] = "cloze" if a.cloze else "greedy"
        model, _ = our_model(folder, device, dtype, a.tokenizer)
        if a.cloze:
            evaluation["ours"], ours = time_our_cloze_scoring(model, tokenizer, test_sets, device)
        else:
            evaluation["ours"], _ = time_our_evaluation(model, tokenizer, test_sets, 32, a.max_new_tokens, device)
        del model
        if not a.no_peft and a.cloze:
            evaluation["transformers"], theirs = time_hf_cloze_scoring(peer, tokenizer, test_sets, device, dtype)
            evaluation["same_answers"] = sum(x == y for name in ours for x, y in zip(ours[name], theirs[name]))
        elif not a.no_peft:
            evaluation["transformers"] = time_hf_evaluation(peer, tokenizer, test_sets, 32, a.max_new_tokens,
                                                            device, dtype)
        evaluation["questions"] = sum(map(len, test_sets.values()))
        write()
    table = format_table(result)
    print(table)
    write_atomically(a.out.with_suffix(".md"), lambda tmp: tmp.write_text(table + "\n"))
    return result


def add_ratios(result: dict):
    """Each row's fraction of the ceiling; ours over peft's same method (an Echo step over its base
    method's is time_training's, paired)."""
    rows = {(r["impl"], r["method"]): r for r in result["train"]}
    for (impl, method), r in rows.items():
        r["of_ceiling"] = r["tokens_per_s"] / result["ceiling_tokens_per_s"]
        r["of_real_shape_limit"] = r["tokens_per_s"] / result["real_shape_limit_tokens_per_s"]
        peer = rows.get(("peft", method))
        if impl == "ours" and peer:
            r["vs_peft"] = r["tokens_per_s"] / peer["tokens_per_s"]


def format_table(result: dict) -> str:
    def cell(value, spec, suffix=""):
        return "-" if value is None else f"{value:{spec}}{suffix}"

    lines = [f"{result['model']} on {result['device']} ({result['threads']} threads), {result['precision']}, "
             f"{result['form']} form, torch {result['torch']}, {result['date']}",
             f"{result['precision']} matmul {result['matmul_tflops'] * 1000:.0f} GFLOP/s -> ceiling "
             f"{result['ceiling_tokens_per_s']:,.0f} real tokens/s (4N FLOP per token)",
             f"the model's frozen matmuls at the step's real shapes -> limit "
             f"{result['real_shape_limit_tokens_per_s']:,.0f} real tokens/s", "",
             "| impl | method | real tokens/s | of ceiling | of real-shape limit | vs peft | step / base method | "
             "step s | peak GiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["train"]:
        lines.append(f"| {r['impl']} | {r['method']} | {r['tokens_per_s']:,.0f} | {r['of_ceiling']:.1%} | "
                     f"{r['of_real_shape_limit']:.1%} | "
                     f"{cell(r.get('vs_peft'), '.2f', 'x')} | {cell(r.get('step_vs_base'), '.2f', 'x')} | "
                     f"{r['step_s']:.2f} | {cell(r['peak_gib'], '.1f')} |")
    for r in result["train"]:
        if "profile_s" in r:
            lines.append(f"profile, {r['impl']} {r['method']}: " + ", ".join(
                f"{op} {s:.1f} s" for op, s in r["profile_s"].items()))
    e = result["evaluation"]
    for impl in ("ours", "transformers"):
        if impl in e:
            lines.append(f"{e['scoring']} evaluation, {e['questions']} real test prompts: {impl} "
                         f"{e[impl]['questions_per_s']:.1f} questions/s")
    if "same_answers" in e:
        lines.append(f"the same answer on {e['same_answers']} of {e['questions']} questions")
    if "transformers" in e:
        lines.append(f"evaluation ratio ours / transformers: "
                     f"{e['ours']['questions_per_s'] / e['transformers']['questions_per_s']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
