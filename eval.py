"""The commonsense evaluator: eight benchmarks under the published protocol, batched and exact.

    python eval.py --ckpt llama-7b --adapter out/echo-lora --datasets all   # the protocol: 4 beams
    python eval.py --ckpt llama-7b --adapter out/echo-lora --num-beams 1   # greedy: fast, not the protocol
    python eval.py --ckpt llama-7b --datasets boolq piqa --limit 100      # the base model, a quick look

The protocol is LLM-Adapters' commonsense_evaluate.py, which DoRA (section 5.1) reuses: the
question in the evaluation prompt (data.commonsense.eval_prompt), BOS and no EOS, up to 32 new
tokens by 4-beam search (transformers 4.36.0's), the answer the first label of the benchmark's set
in what was written; a reply naming none is wrong. One difference, on purpose: upstream pads on
the left without an attention mask, so only batch size 1 is right (LLM-Adapters issue 61); here
every batch size gives batch size 1's answers. `--scoring likelihood` ranks the labels by
log-likelihood, `--scoring cloze` each choice's text (with train.py --cloze): other measurements,
each written to its own files.
"""

import argparse
import hashlib
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data.checkpoints import (PRECISIONS, device_and_precision, device_description, resolve_checkpoint, resolve_device,
                              slow_precision_warning)
from data.commonsense import cloze_choices, cloze_prompt, eval_prompt, load_records
from data.files import (code_version, locked_folder, output_files, output_folder, read_bytes, read_run_record,
                        recorded_path, write_atomically)
from data.published import PROTOCOL_PRECISION, PUBLISHED, default_published, published_rows
from data.tokenizer import Tokenizer
from echo_lora import load_adapter, merge
from llama import KVCache, Transformer, attention_mask, load


class Benchmark(NamedTuple):
    column: str  # the column name of the published tables
    labels: str  # the label set as upstream's extract_answer searches for it


# Keyed by upstream's dataset folder names, in the column order of the published tables. The
# patterns are upstream's: plain alternations, case-sensitive, without word boundaries.
BENCHMARKS = {
    "boolq": Benchmark("BoolQ", "true|false"),
    "piqa": Benchmark("PIQA", "solution1|solution2"),
    "social_i_qa": Benchmark("SIQA", "answer1|answer2|answer3|answer4|answer5"),
    "hellaswag": Benchmark("HellaSwag", "ending1|ending2|ending3|ending4"),
    "winogrande": Benchmark("WinoGrande", "option1|option2"),
    "ARC-Easy": Benchmark("ARC-e", "answer1|answer2|answer3|answer4|answer5"),
    "ARC-Challenge": Benchmark("ARC-c", "answer1|answer2|answer3|answer4|answer5"),
    "openbookqa": Benchmark("OBQA", "answer1|answer2|answer3|answer4|answer5"),
}


# The weights' dtypes eval.py offers: train.py's, plus fp16, the one the protocol evaluates in
# (data/published.PROTOCOL_PRECISION): the default on CUDA.
EVAL_PRECISIONS = {**PRECISIONS, "fp16": torch.float16}


RESPONSE_MARKER = "### Response:"  # where upstream cuts the decoded text
ANSWER_TEMPLATE = "the correct answer is {}"  # every record's `output`, the text training taught
# Which score transformers' stopping rule (early_stopping=False) compares with the worst finished
# hypothesis. 4.36.0 (DoRA's pin): the best of this step's candidates, a candidate that ends
# included (BeamSearchScorer.process passes next_scores.max() to BeamHypotheses.is_done).
# 5.x: the best candidate that goes on (the best running beam), so it stops no later than 4.36.
BEAM_RULES = ("transformers-4.36", "transformers-5")


# --------------------------------------------------------------------------------------------
# The protocol: a reply to each question, and the label it names (decoding itself: the end of the file)


def extract_answer(dataset: str, generated: str) -> str:
    """The label upstream's extract_answer finds in `generated` (the new tokens alone), or "" (wrong).

    Upstream splits prompt + new text on "### Response:" and keeps part [1]: the prompt ends with the
    one marker, so that is the new text up to any marker the model writes itself (NVlabs/DoRA's copy
    keeps [-1]; they differ only then). The first match wins, case-sensitive, without word
    boundaries: "answer12" gives "answer1" and "True" gives "", as upstream's regex does."""
    response = generated.split(RESPONSE_MARKER)[0]
    match = re.search(BENCHMARKS[dataset].labels, response)
    return match.group(0) if match else ""


def candidate_labels(dataset: str, record: dict) -> list[str]:
    """The labels its "Answer format: answer1/answer2/..." line lists (some ARC questions have 3 or 5
    choices), else the benchmark's whole label set."""
    _, marker, answer_format = record["instruction"].rpartition("Answer format:")
    pattern = BENCHMARKS[dataset].labels
    return (marker and re.findall(pattern, answer_format)) or pattern.split("|")


def check_fits(model: Transformer, dataset: str, lengths: list[int], what: str):
    """Every sequence within the model's rotary table, else a ValueError naming the first that is not."""
    too_long = [i for i, n in enumerate(lengths) if n > model.max_positions]
    if too_long:
        i = too_long[0]
        raise ValueError(f"{dataset} item {i}: {what} is {lengths[i]} tokens, beyond the {model.max_positions} "
                         f"positions of the model's rotary table ({len(too_long)} such items)")


def prediction(dataset: str, index: int, record: dict, generated: str | None, answer: str) -> dict:
    """One line of predictions.jsonl."""
    return dict(dataset=dataset, index=index, generated=generated, answer=answer, gold=record["answer"],
                correct=answer == record["answer"])


def evaluate(model: Transformer, tokenizer: Tokenizer, dataset: str, records: list[dict], batch_size: int = 32,
             num_beams: int = 4, max_new_tokens: int = 32, beam_rule: str = BEAM_RULES[0]) -> list[dict]:
    """Generate a reply to every record and extract its label: one prediction per record, in
    file order, with its dataset, index, generated text, extracted answer and gold label."""
    prompts = [tokenizer.encode(eval_prompt(record), bos=True, eos=False) for record in records]
    check_fits(model, dataset, [len(p) + max_new_tokens for p in prompts], f"prompt + --max-new-tokens {max_new_tokens}")
    # Longest first: a batch holds prompts of similar length (little padding), and the largest
    # batch runs first, so running out of memory shows at once rather than at the end.
    order = sorted(range(len(records)), key=lambda i: -len(prompts[i]))
    generated = [""] * len(records)
    with tqdm(total=len(records), desc=dataset, unit="q") as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            try:
                new_ids = decode_batch(model, tokenizer, [prompts[i] for i in batch], num_beams, max_new_tokens,
                                       beam_rule)
            except NonFiniteLogits as e:
                raise NonFiniteLogits(f"{dataset} items {sorted(batch)}: {e}; nothing written") from None
            for i, ids in zip(batch, new_ids):
                generated[i] = tokenizer.decode(ids)
            bar.update(len(batch))
    return [prediction(dataset, i, record, text, extract_answer(dataset, text))
            for i, (record, text) in enumerate(zip(records, generated))]


# --------------------------------------------------------------------------------------------
# Likelihood ranking (not the published protocol)


# Questions scored per forward, packed into one row: a question's ~50 tokens alone run a CPU's
# matmuls at two thirds of their rate and read every weight for little work; the dense mask's
# cost, quadratic in the row, stays small at a few hundred tokens.
QUESTIONS_PER_ROW = 4


@torch.no_grad()
def continuation_logprobs(model: Transformer, tokenizer: Tokenizer, dataset: str,
                          questions: list[tuple[str, list[str]]]) -> list[list[float]]:
    """The summed log-probability of each continuation after its prompt, for a few (prompt,
    continuations) questions in one forward.

    The prompt and the continuation are tokenised as one text (as the model read them in training),
    and the continuation is every token after the first len(tokens of the prompt alone): the rule
    data.commonsense.encode_record masks the training labels by, so the scored tokens are the ones
    answer-only training taught. One row holds, question after question, the ids its texts share
    (computed once) and then each text's rest. A token attends only to its question's shared ids and
    to its own text, causally, at the position it has in that text: each text is computed as if alone.
    """
    device = model.output.weight.device
    tokens, positions, question_of, text_of = [], [], [], []  # per place in the row; text -1: shared ids
    scored = []  # (text, place in the row) of every scored token
    n_texts = 0
    for q, (prompt, continuations) in enumerate(questions):
        n_prompt = len(tokenizer.encode(prompt, bos=True, eos=False))
        texts = [tokenizer.encode(prompt + text, bos=True, eos=False) for text in continuations]
        if max(map(len, texts)) > model.max_positions:
            raise ValueError(f"{dataset}: a prompt + answer of {max(map(len, texts))} tokens, beyond the "
                             f"{model.max_positions} positions of the model's rotary table")
        # the state at n_prompt - 1 predicts the first scored token, so it is each text's own
        n_shared = min(shared_prefix_length(texts), n_prompt - 1)
        tokens += texts[0][:n_shared]
        positions += range(n_shared)
        question_of += [q] * n_shared
        text_of += [-1] * n_shared
        for ids in texts:
            scored += [(n_texts, len(tokens) + t - n_shared) for t in range(n_prompt, len(ids))]
            tokens += ids[n_shared:]
            positions += range(n_shared, len(ids))
            question_of += [q] * (len(ids) - n_shared)
            text_of += [n_texts] * (len(ids) - n_shared)
            n_texts += 1
    place = torch.arange(len(tokens), device=device)
    question_of, text_of = torch.tensor(question_of, device=device), torch.tensor(text_of, device=device)
    sees = ((place[None, :] <= place[:, None]) & (question_of[None, :] == question_of[:, None])
            & ((text_of[None, :] == -1) | (text_of[None, :] == text_of[:, None])))  # (row, row): query, key
    tokens = torch.tensor(tokens, device=device)
    hidden, _ = model.hidden_states(tokens[None], torch.tensor(positions, device=device)[None], sees[None, None])
    text, at = torch.tensor(scored, device=device).reshape(-1, 2).unbind(1)
    # the head only where a token is scored, on the state just before it in the row
    logprobs = F.log_softmax(model.output(hidden[0, at - 1]).float(), dim=-1)  # (N_scored, vocab)
    totals = torch.zeros(n_texts, device=device).index_add_(0, text, logprobs.gather(-1, tokens[at, None])[:, 0])
    return [chunk.tolist() for chunk in totals.split([len(c) for _, c in questions])]


def candidates(dataset: str, record: dict, scoring: str) -> tuple[str, list[str], list[str], list[int]]:
    """(prompt, continuations, their labels, what each log-probability is divided by) of a question.

    --scoring likelihood: "the correct answer is <label>" after the evaluation prompt, for each of
    the question's labels, not normalised. --scoring cloze (with train.py --cloze, a departure):
    each choice's text after "Question: q / Answer:", divided by its length in UTF-8 bytes (the
    length normalisation small models are usually scored with).
    """
    if scoring == "cloze":
        question, choices, labels = cloze_choices(record)
        return cloze_prompt(question), [" " + c for c in choices], labels, [len(c.encode()) for c in choices]
    labels = candidate_labels(dataset, record)
    return eval_prompt(record), [ANSWER_TEMPLATE.format(label) for label in labels], labels, [1] * len(labels)


def rank_by_likelihood(model: Transformer, tokenizer: Tokenizer, dataset: str, records: list[dict],
                       scoring: str = "likelihood") -> list[dict]:
    """Predictions whose answer is the most likely label (--scoring likelihood) or choice (cloze);
    no text is generated."""
    predictions = []
    with tqdm(total=len(records), desc=f"{dataset} ({scoring})", unit="q") as progress:
        for start in range(0, len(records), QUESTIONS_PER_ROW):
            asked = [candidates(dataset, record, scoring) for record in records[start:start + QUESTIONS_PER_ROW]]
            totals = continuation_logprobs(model, tokenizer, dataset, [(prompt, texts) for prompt, texts, _, _ in asked])
            for i, (record, (_, _, labels, lengths), scores) in enumerate(zip(records[start:], asked, totals), start):
                logprobs = {label: total / n for label, total, n in zip(labels, scores, lengths)}
                if not all(math.isfinite(v) for v in logprobs.values()):
                    raise NonFiniteLogits(f"{dataset} item {i}: the model's log-likelihoods are not finite (NaN or "
                                          "inf); nothing written")
                predictions.append(prediction(dataset, i, record, None, max(logprobs, key=logprobs.get))
                                   | {"label_logprobs": logprobs})
            progress.update(len(asked))
    return predictions


# --------------------------------------------------------------------------------------------
# Scores and the table


def score(predictions: list[dict]) -> dict:
    """Accuracy of one benchmark's predictions; an unanswered item (no label found) is wrong."""
    n = len(predictions)
    correct = sum(p["correct"] for p in predictions)
    return dict(accuracy=correct / n if n else 0.0, correct=correct, n=n,
                unanswered=sum(p["answer"] == "" for p in predictions))


def average_accuracy(results: dict[str, dict]) -> float:
    """The published tables' average: the mean of the per-benchmark accuracies."""
    return sum(r["accuracy"] for r in results.values()) / len(results) if results else 0.0


def format_table(results: dict[str, dict], published: dict[str, tuple] | None) -> str:
    """Markdown: this run's accuracy (%), items and unanswered items per benchmark, then the
    published rows for the same base model (PUBLISHED[name]), in the published column order."""
    def row(name, cells):
        return "| " + " | ".join([name, *cells]) + " |"

    def this_run(field, fmt):
        return [fmt(results[d][field]) if d in results else "-" for d in BENCHMARKS]

    def total(field):
        return str(sum(r[field] for r in results.values()))

    lines = [row("", [b.column for b in BENCHMARKS.values()] + ["Average / total"]),
             row("---", ["---:"] * (len(BENCHMARKS) + 1)),
             row("this run (%)", this_run("accuracy", lambda a: f"{100 * a:.1f}")
                 + [f"{100 * average_accuracy(results):.1f}"]),
             row("items", this_run("n", str) + [total("n")]),
             row("unanswered", this_run("unanswered", str) + [total("unanswered")])]
    for name, accuracies in (published or {}).items():
        lines.append(row(f"{name} (published)", [f"{a:.1f}" for a in accuracies]))
    if published and len(results) < len(BENCHMARKS):
        lines.append(f"\nThis run's average covers {len(results)} of the {len(BENCHMARKS)} benchmarks; "
                     "the published averages cover all of them.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The command line


def dataset_names(requested: list[str]) -> list[str]:
    """`--datasets` as benchmark names in table order; `all` is the eight."""
    unknown = [name for name in requested if name != "all" and name not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown dataset {', '.join(map(repr, unknown))}; valid names: "
                         f"{', '.join(BENCHMARKS)}, or all")
    return [name for name in BENCHMARKS if name in requested or "all" in requested]


def read_test_sets(data_dir: Path, datasets: list[str], limit: int | None) -> tuple[dict, dict, dict]:
    """({name: records}, {name: why it is missing}, {name: the test file's SHA-256})."""
    test_sets, missing, digests = {}, {}, {}
    for name in datasets:
        path = data_dir / name / "test.json"
        if not path.exists():  # a FIFO or a folder there is load_records' error, not a skipped set
            missing[name] = f"no test set at {path} (python data/download.py fetches it)"
            continue
        digests[name] = hashlib.sha256(read_bytes(path)).hexdigest()
        records = load_records(path)[:limit]
        if not records:  # averaged in, it would count as 0% (a third of 33.3 gone for nothing)
            missing[name] = f"the test set {path} holds no records"
            continue
        test_sets[name] = records
    if not test_sets:
        raise FileNotFoundError(f"none of the test sets found: {'; '.join(missing.values())}")
    return test_sets, missing, {name: digests[name] for name in test_sets}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--ckpt", help="checkpoints/NAME, or a path to a Meta-layout LLaMA folder (an HF folder: "
                                       "scripts/convert_hf.py first) (required)")
    parser.add_argument("--adapter", type=Path, help="adapter folder from train.py, merged into the weights "
                                                     "(default: evaluate the base model)")
    parser.add_argument("--datasets", nargs="+", default=["all"], metavar="NAME",
                        help=f"some of {' '.join(BENCHMARKS)}, or all (default)")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parent / "data",
                        help="folder holding <dataset>/test.json (default: this repo's data/)")
    parser.add_argument("--out", type=Path, help="output folder (default: the adapter folder, "
                                                 "or out/eval-<ckpt> for the base model)")
    parser.add_argument("--scoring", choices=["generate", "likelihood", "cloze"], default="generate",
                        help="generate a reply and extract its label (the protocol), or rank the labels "
                             "by log-likelihood, or (cloze, for train.py --cloze) rank each choice's text by its "
                             "length-normalised log-likelihood (default: generate)")
    parser.add_argument("--num-beams", type=positive_int, default=4,
                        help="4: the protocol's beam search (default); 1: greedy, faster, not the protocol")
    parser.add_argument("--beam-rule", choices=BEAM_RULES, default=BEAM_RULES[0],
                        help="whose beam-search stopping rule: transformers 4.36.0's (the protocol's, "
                             "default) or transformers 5's")
    parser.add_argument("--max-new-tokens", type=positive_int, default=32,
                        help="the longest reply generated, in tokens (default: 32)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="questions per batch (default: 32)")
    parser.add_argument("--limit", type=positive_int, help="only the first N items of each test set (default: all)")
    parser.add_argument("--published", choices=[*PUBLISHED, "none"],
                        help="published rows to print beside the results (default: the ckpt name, if it is one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results of an earlier evaluation in --out (default: refuse to)")
    parser.add_argument("--precision", choices=list(EVAL_PRECISIONS),
                        help="the weights' dtype (the adapter is merged into them); default: fp16 on cuda (the "
                             "protocol's), fp32 elsewhere")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = arg_parser()
    args = parser.parse_args(argv)
    if not args.ckpt:
        parser.error("--ckpt is required")
    try:  # the weights' dtype on CUDA is the protocol's fp16; on a CPU fp32 (half precision is slow there)
        _, args.precision = device_and_precision(args.device, args.precision, PROTOCOL_PRECISION)
    except ValueError as e:
        parser.error(str(e))
    args.published = args.published or default_published(args.ckpt)
    args.out = args.out or args.adapter or Path("out") / f"eval-{Path(args.ckpt).name}"
    return args


def load_model(args) -> tuple[Transformer, Tokenizer]:
    """The checkpoint in eval mode, with the adapter merged into its weights if one is given."""
    model, tokenizer = load(resolve_checkpoint(args.ckpt), args.device, EVAL_PRECISIONS[args.precision])
    if tokenizer is None:
        raise FileNotFoundError(f"{args.ckpt}: no tokenizer.model or tokenizer.json beside the weights (or tokenizer.model one folder up)")
    if args.adapter is not None:  # the checksum of the tensors loaded: results.json names the adapter scored
        args.adapter_sha256 = load_adapter(args.adapter, model).get("tensors_sha256")
        merge(model)  # plain linears again: decoding costs what the base model costs
    return model, tokenizer


def read_train_config(adapter: Path | None) -> dict | None:
    """train.py's flags for the adapter (its run record), or None (another program's config.json)."""
    record = read_run_record(adapter) if adapter is not None else None
    return record.get("config") if record is not None else None


def scoring_description(args) -> str:
    if args.scoring == "likelihood":
        return "Log-likelihood ranking of the labels (not the published protocol)."
    if args.scoring == "cloze":
        return ("Cloze ranking: each choice's text after 'Question: q / Answer:', by log-likelihood per UTF-8 byte "
                "(not the published protocol).")
    decoding = "Greedy decoding" if args.num_beams == 1 else f"{args.num_beams}-beam search ({args.beam_rule}'s rule)"
    return f"{decoding}, at most {args.max_new_tokens} new tokens."


def write_text(path: Path, text: str):
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def report(args, trained: dict | None, predictions: dict[str, list[dict]], missing: dict[str, str],
           seconds: dict[str, float], tests: dict[str, str]) -> str:
    """Write results.md, results.json and predictions.jsonl under args.out (with the scoring's suffix);
    return the markdown."""
    results = {name: score(preds) for name, preds in predictions.items()}
    published, notes = published_rows(args, trained)
    # paths relative to the repository (recorded_path): committed results name no machine's folders
    lines = [f"# {args.ckpt}" + (f" + {recorded_path(args.adapter)}" if args.adapter else " (base model)"),
             "", scoring_description(args), "", format_table(results, published)]
    lines += [f"- {name}: not run, {why}" for name, why in missing.items()] + notes
    markdown = "\n".join(lines) + "\n"
    predictions_file, markdown_file, results_file = (args.out / name for name in output_files(results_suffix(args)))
    args.out.mkdir(parents=True, exist_ok=True)
    # One unit: results.json goes first and comes back last, naming the predictions it was made
    # with, so an --overwrite cut short never leaves new results beside old predictions.
    results_file.unlink(missing_ok=True)
    lines = "".join(json.dumps(p) + "\n" for preds in predictions.values() for p in preds)
    write_text(predictions_file, lines)
    write_text(markdown_file, markdown)
    summary = dict(results=results, average=average_accuracy(results), missing=missing, seconds=seconds,
                   published={args.published: published} if published else {},
                   args={k: recorded_path(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                         if k != "adapter_sha256"},
                   code=code_version(), device=device_description(resolve_device(args.device)), test_sha256=tests, adapter_sha256=getattr(args, "adapter_sha256", None),
                   predictions_sha256=hashlib.sha256(lines.encode("utf-8")).hexdigest())
    write_text(results_file, json.dumps(summary, indent=2) + "\n")
    return markdown


def results_suffix(args) -> str:
    return "" if args.scoring == "generate" else f"-{args.scoring}"


def run(args) -> str:
    """The evaluation, holding --out as its one writer (a train.py still writing there is
    refused, as it refuses eval.py: results.json must name the adapter the folder holds)."""
    with locked_folder(args.out):
        return evaluate_all(args)


def evaluate_all(args) -> str:
    # Everything about the input and the output is checked before the model (minutes at 7B) is loaded.
    output_folder(args.out)
    finished = args.out / output_files(results_suffix(args))[2]
    if finished.exists() and not args.overwrite:
        raise FileExistsError(f"{finished}: an earlier evaluation's results; --overwrite replaces them, "
                              "--out writes elsewhere")
    test_sets, missing, tests = read_test_sets(args.data_dir, dataset_names(args.datasets), args.limit)
    trained = read_train_config(args.adapter)  # a broken one is an error now, not after the decoding
    for name, why in missing.items():
        print(f"eval.py: {name}: {why}; skipped", file=sys.stderr)
    if slow := slow_precision_warning(args.device, args.precision, EVAL_PRECISIONS[args.precision]):
        print(f"eval.py: {slow}", file=sys.stderr)
    model, tokenizer = load_model(args)
    check_questions(model, tokenizer, test_sets, args)
    check_logits(model, tokenizer, test_sets, args)
    predictions, seconds = {}, {}
    for name, records in test_sets.items():
        start = time.perf_counter()
        if args.scoring != "generate":
            predictions[name] = rank_by_likelihood(model, tokenizer, name, records, args.scoring)
        else:
            predictions[name] = evaluate(model, tokenizer, name, records, args.batch_size, args.num_beams,
                                         args.max_new_tokens, args.beam_rule)
        seconds[name] = time.perf_counter() - start
    return report(args, trained, predictions, missing, seconds, tests)


def check_questions(model: Transformer, tokenizer: Tokenizer, test_sets: dict[str, list[dict]], args):
    """Every question checked before any is scored, so a bad one found late leaves nothing half-written."""
    def length(text):
        return len(tokenizer.encode(text, bos=True, eos=False))

    for name, records in test_sets.items():
        if args.scoring == "generate":
            what, lengths = (f"prompt + --max-new-tokens {args.max_new_tokens}",
                             [length(eval_prompt(r)) + args.max_new_tokens for r in records])
        elif args.scoring == "likelihood":
            what, lengths = "prompt + answer", [max(length(eval_prompt(r) + ANSWER_TEMPLATE.format(label))
                                                    for label in candidate_labels(name, r)) for r in records]
        else:
            what, lengths = "cloze prompt + choice", []
            for i, record in enumerate(records):
                try:
                    question, choices, _ = cloze_choices(record)
                except ValueError as e:
                    raise ValueError(f"{args.data_dir / name / 'test.json'}: record {i}: {e}") from None
                lengths.append(max(length(cloze_prompt(question) + " " + choice) for choice in choices))
        check_fits(model, name, lengths, what)


@torch.no_grad()
def check_logits(model: Transformer, tokenizer: Tokenizer, test_sets: dict[str, list[dict]], args):
    """One forward of the first question before any is scored: a model computing NaN stops here."""
    name, records = next(iter(test_sets.items()))
    prompt = tokenizer.encode(eval_prompt(records[0]), bos=True, eos=False)[-model.max_positions:]
    logits = model(torch.tensor([prompt], device=model.output.weight.device))
    if not torch.isfinite(logits).all():
        adapter = f" + {args.adapter}" if args.adapter is not None else ""
        raise ValueError(f"{args.ckpt}{adapter}: the model's logits on {name} item 0 are not finite (NaN or inf) in "
                         f"{args.precision}: a broken checkpoint" + (" or fp16 overflow" if args.precision == "fp16" else "")
                         + "; nothing evaluated")


def main(argv=None) -> int:
    """Run the evaluation; bad input is one line on stderr and exit code 1, not a traceback."""
    args = parse_args(argv)
    try:
        print(run(args))
    except (OSError, ValueError) as e:
        print(f"eval.py: {e}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------------------------
# Decoding, the model's generation that evaluate() calls: greedy, and the protocol's beam search


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids with each prompt flush right, and (B, T) bool, True at real tokens."""
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((len(prompts), longest), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.tensor(p, device=device)
        valid[i, longest - len(p):] = True
    return tokens, valid


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """The number of leading ids every prompt shares, leaving each at least one id of its own."""
    shortest = min(len(p) for p in prompts)
    n = 0
    while n < shortest - 1 and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


class DecodingCache(KVCache):
    """A KVCache that decoding appends to in place, in buffers reserved once after the prompt
    (concatenating copies the whole cache at every new token). Under no_grad only."""

    buffers = None  # preallocated (k, v) with room to grow, see `reserve`

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.buffers is None:
            return super().update(k, v)
        start, end = self.k.shape[2], self.k.shape[2] + k.shape[2]
        self.buffers[0][:, :, start:end], self.buffers[1][:, :, start:end] = k, v
        self.view_buffers(end)
        return self.k, self.v

    def reserve(self, extra: int):
        """Room for `extra` more positions after those cached."""
        B, H, T, D = self.k.shape
        self.buffers = tuple(t.new_empty(B, H, T + extra, D) for t in (self.k, self.v))
        self.buffers[0][:, :, :T], self.buffers[1][:, :, :T] = self.k, self.v
        self.view_buffers(T)

    def view_buffers(self, length: int):
        """k and v become the first `length` positions of the buffers."""
        self.k, self.v = self.buffers[0][:, :, :length], self.buffers[1][:, :, :length]

    def select(self, rows: torch.Tensor) -> "DecodingCache":
        """The cache of a subset (or reordering) of the batch's rows, its buffers with it."""
        if self.buffers is None:
            return DecodingCache(self.k[rows], self.v[rows])
        chosen = DecodingCache()
        chosen.buffers = (self.buffers[0][rows], self.buffers[1][rows])
        chosen.view_buffers(self.k.shape[2])
        return chosen


@torch.no_grad()
def prefill(model: Transformer, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0):
    """Run left-padded prompts through the model once, filling fresh caches with room for `max_new_tokens`.

    The ids every prompt starts with (a third of an evaluation prompt) are computed once and shared
    by every row. Positions count only real tokens and the mask hides the padding, so a batch decodes
    exactly like one prompt at a time. Returns the last position's logits (B, vocab), the caches, the
    key mask (B, T) and each row's next position (B,)."""
    device = model.output.weight.device
    n_shared = shared_prefix_length(prompts)
    caches = [DecodingCache() for _ in model.layers]
    if n_shared:
        model.hidden_states(torch.tensor([prompts[0][:n_shared]], device=device), caches=caches)
        for cache in caches:  # one row's keys and values, seen by every row (expand: no copy)
            cache.k, cache.v = (t.expand(len(prompts), -1, -1, -1) for t in (cache.k, cache.v))
    tokens, rest_valid = left_pad([p[n_shared:] for p in prompts], pad_id, device)
    positions = n_shared + (rest_valid.cumsum(1) - 1).clamp(min=0)
    valid = torch.cat([rest_valid.new_ones(len(prompts), n_shared), rest_valid], dim=1)  # every key
    hidden, _ = model.hidden_states(tokens, positions, attention_mask(valid, tokens.shape[1]), caches)
    for cache in caches:
        cache.reserve(max_new_tokens)
    return finite(model.output(hidden[:, -1])), caches, valid, positions[:, -1] + 1


class NonFiniteLogits(ValueError):
    """A model that computes NaN or infinity on a question: stops the evaluation, nothing written."""


def finite(logits: torch.Tensor) -> torch.Tensor:
    """`logits`, checked at every decoding step of every batch (not the first question's prompt
    only): an argmax over NaN picks a token all the same, so nothing non-finite may be decoded."""
    if not torch.isfinite(logits).all():
        raise NonFiniteLogits("the model's logits are not finite (NaN or inf)")
    return logits


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids,
             pad_id: int = 0) -> list[list[int]]:
    """Batched greedy decoding; returns each prompt's new ids, up to (not including) a stop id."""
    logits, caches, valid, next_pos = prefill(model, prompts, max_new_tokens, pad_id)
    B, device = len(prompts), valid.device
    stop = torch.tensor(sorted(stop_ids), device=device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new_tokens = []
    for _ in range(max_new_tokens):
        token = logits.float().argmax(-1)
        done = done | torch.isin(token, stop)
        new_tokens.append(torch.where(done, -1, token))
        if done.all():
            break
        valid = torch.cat([valid, torch.ones((B, 1), dtype=torch.bool, device=device)], dim=1)
        logits = finite(model(token[:, None], next_pos[:, None], valid[:, None, None, :], caches)[:, -1])
        next_pos = next_pos + 1
    out = torch.stack(new_tokens, dim=1).tolist() if new_tokens else [[] for _ in prompts]
    return [[t for t in row if t >= 0] for row in out]


def add_hypothesis(finished: list, score: float, ids: list[int], num_beams: int):
    """Keep the best `num_beams` finished hypotheses, best first; on a tie the earlier one."""
    finished.append((score, ids))
    finished.sort(key=lambda hypothesis: -hypothesis[0])  # stable
    del finished[num_beams:]



def can_improve(finished: list, best: float, n_generated: int, num_beams: int, length_penalty: float) -> bool:
    """transformers' stopping rule (early_stopping=False): search on while fewer than num_beams
    hypotheses are finished, or while `best` (BEAM_RULES), normalised by length, beats the worst."""
    return len(finished) < num_beams or best / n_generated**length_penalty > finished[-1][0]


@torch.no_grad()
def beam_search(model: Transformer, prompts: list[list[int]], num_beams: int, max_new_tokens: int, stop_ids,
                pad_id: int = 0, length_penalty: float = 1.0, rule: str = BEAM_RULES[0]) -> list[list[int]]:
    """Each prompt's best beam-search continuation, up to (not including) a stop id.

    transformers' beam search (do_sample=False, early_stopping=False) under `rule` (BEAM_RULES; the
    tests check it against transformers' generate). Per question and step the candidates are the best
    (1 + number of stop ids, at least 2) x num_beams extensions by summed log-probability; those among
    the best num_beams that end become finished hypotheses, scored sum / generated_length **
    length_penalty (4.36.0's normalisation, the stop token counted); the best num_beams that do not end
    go on; at max_new_tokens the best num_beams are finished as they stand; a question leaves the
    batch when `can_improve` says so. Questions are batched, num_beams rows each, with masked left
    padding as in `generate`; the cache rows follow their beams through DecodingCache.select."""
    device = model.output.weight.device
    stop = torch.tensor(sorted(stop_ids), device=device)
    n_candidates = max(2, 1 + len(stop)) * num_beams
    logits, caches, valid, next_pos = prefill(model, prompts, max_new_tokens, pad_id)
    # Every question starts as num_beams copies of its prompt, all but the first at -1e9, so the
    # first step extends one beam only (what transformers does, kept for identical tie-breaking).
    rows = torch.arange(len(prompts), device=device).repeat_interleave(num_beams)
    caches = [cache.select(rows) for cache in caches]
    logits, valid, next_pos = logits[rows], valid[rows], next_pos[rows]
    beam_scores = torch.full((len(prompts), num_beams), -1e9, device=device)
    beam_scores[:, 0] = 0
    beams = torch.empty((len(prompts), num_beams, 0), dtype=torch.long, device=device)  # new ids so far
    finished = [[] for _ in prompts]  # per question: (score, new ids), best first
    active = list(range(len(prompts)))  # the questions still in the batch, in row order
    for n_generated in range(1, max_new_tokens + 1):
        vocab = logits.shape[-1]
        scores = F.log_softmax(logits.float(), dim=-1).view(len(active), num_beams, vocab) + beam_scores[:, :, None]
        top_scores, top_index = scores.view(len(active), -1).topk(n_candidates)  # (A, n_candidates), best first
        parent, token = top_index // vocab, top_index % vocab
        extended = torch.cat([beams.gather(1, parent[:, :, None].expand(-1, -1, beams.shape[2])),
                              token[:, :, None]], dim=2)  # (A, n_candidates, n_generated)
        ends = torch.isin(token, stop) | (n_generated == max_new_tokens)
        ending = ends[:, :num_beams].nonzero().tolist()
        for a, k in ending:
            add_hypothesis(finished[active[a]], top_scores[a, k].item() / n_generated**length_penalty,
                           extended[a, k].tolist(), num_beams)
        if n_generated == max_new_tokens:
            break
        beam_scores, chosen = top_scores.masked_fill(ends, -1e9).topk(num_beams)  # (A, num_beams)
        beams = extended.gather(1, chosen[:, :, None].expand(-1, -1, n_generated))
        best = (top_scores if rule == "transformers-4.36" else beam_scores)[:, 0].tolist()
        keep = torch.tensor([can_improve(finished[q], best[a], n_generated, num_beams, length_penalty)
                             for a, q in enumerate(active)], device=device)
        if not keep.any():
            break
        # The cache rows the kept questions' new beams continue: question a's rows start at a * num_beams.
        first_row = torch.arange(len(active), device=device)[:, None] * num_beams
        rows = (first_row + parent.gather(1, chosen))[keep].flatten()
        caches = [cache.select(rows) for cache in caches]
        active = [q for q, kept in zip(active, keep.tolist()) if kept]
        beams, beam_scores = beams[keep], beam_scores[keep]
        valid = torch.cat([valid[rows], torch.ones((len(rows), 1), dtype=torch.bool, device=device)], dim=1)
        next_pos = next_pos[rows]
        logits = finite(model(beams[:, :, -1].reshape(-1, 1), next_pos[:, None], valid[:, None, None, :], caches)[:, -1])
        next_pos = next_pos + 1
    best = [hypotheses[0][1] for hypotheses in finished]
    return [ids[:-1] if ids[-1] in stop_ids else ids for ids in best]


def decode_batch(model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]], num_beams: int,
                 max_new_tokens: int, beam_rule: str = BEAM_RULES[0]) -> list[list[int]]:
    """New ids for a batch of prompts: greedy for num_beams 1, else beam search."""
    if num_beams == 1:
        return generate(model, prompts, max_new_tokens, tokenizer.stop_ids, tokenizer.pad_id)
    return beam_search(model, prompts, num_beams, max_new_tokens, tokenizer.stop_ids, tokenizer.pad_id,
                       rule=beam_rule)


if __name__ == "__main__":
    sys.exit(main())
