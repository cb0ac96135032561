"""Commonsense records and the prompt protocol of the published commonsense recipe.

The recipe is LLM-Adapters' (Hu et al., 2023), reused by DoRA (section 5.1): fine-tune on
commonsense_170k, evaluate on eight test sets. A record holds four strings: `instruction` (question,
choices, answer format), `input` (always ""), `output` ("the correct answer is <answer>") and
`answer` (the label). The two templates are upstream's byte for byte, whitespace quirks included
(`_train_text`, `eval_prompt`): the published numbers were made with exactly these bytes.
"""

import json
import re
from pathlib import Path

from data.files import refuse_constant, regular_file

IGNORE_INDEX = -100  # label value the cross-entropy loss skips (torch's default ignore_index)
FIELDS = ("instruction", "input", "output", "answer")

TASK = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
TASK_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context."
    " Write a response that appropriately completes the request."
)
INDENT = " " * 16  # upstream's f-string sits 16 columns deep; the indentation is part of the prompt


def _train_text(record: dict, output: str) -> str:
    """Training template: LLM-Adapters finetune.py `generate_prompt(data_point)` (as NVlabs/DoRA's).
    Its first line ends in 2 spaces (1 with input), then an empty line; the separators are 16 spaces."""
    if record["input"]:
        lines = [
            TASK_WITH_INPUT + " ",
            "",
            INDENT + "### Instruction:",
            INDENT + record["instruction"],
            INDENT,
            INDENT + "### Input:",
            INDENT + record["input"],
            INDENT,
            INDENT + "### Response:",
            INDENT + output,
        ]
    else:
        lines = [
            TASK + "  ",
            "",
            INDENT + "### Instruction:",
            INDENT + record["instruction"],
            INDENT,
            INDENT + "### Response:",
            INDENT + output,
        ]
    return "\n".join(lines)


def train_prompt(record: dict) -> str:
    """The full text the model is trained on: prompt, 16 spaces, then the output."""
    return _train_text(record, record["output"])


def train_prompt_without_output(record: dict) -> str:
    """The training template with output "": upstream tokenises this to count prompt tokens."""
    return _train_text(record, "")


def eval_prompt(record: dict) -> str:
    """Evaluation template: LLM-Adapters commonsense_evaluate.py `generate_prompt` (as NVlabs/DoRA's).
    Unlike training: the first line ends in 1 space (none with input), the separators are empty, and
    it ends with "### Response:", a newline and 16 spaces."""
    if record["input"]:
        lines = [
            TASK_WITH_INPUT,
            "",
            INDENT + "### Instruction:",
            INDENT + record["instruction"],
            "",
            INDENT + "### Input:",
            INDENT + record["input"],
            "",
            INDENT + "### Response:",
            INDENT,
        ]
    else:
        lines = [
            TASK + " ",
            "",
            INDENT + "### Instruction:",
            INDENT + record["instruction"],
            "",
            INDENT + "### Response:",
            INDENT,
        ]
    return "\n".join(lines)


def parse_records(text: str, source: str) -> list[dict]:
    """Parse and check a commonsense-format JSON array; `source` names it in every error."""
    try:
        records = json.loads(text, parse_constant=refuse_constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:  # NaN, a number of thousands of digits, nesting too deep
        raise ValueError(f"{source}: not valid JSON: {e}") from None
    if not isinstance(records, list):
        raise ValueError(f"{source}: expected a JSON array of records, found {type(records).__name__}")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{source}: record {i}: expected an object with keys {', '.join(FIELDS)}, "
                             f"found {type(record).__name__}")
        for key in FIELDS:
            if key not in record:
                raise ValueError(f"{source}: record {i}: missing key {key!r}")
            if not isinstance(record[key], str):
                raise ValueError(f"{source}: record {i}: key {key!r} must be a string, "
                                 f"found {type(record[key]).__name__}")
            try:
                record[key].encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate (a \ud800 escape): no tokenizer takes it
                raise ValueError(f"{source}: record {i}: key {key!r} is not text: {e.reason} "
                                 f"{record[key][e.start:e.end]!r} at character {e.start}") from None
    return records


def load_records(path) -> list[dict]:
    """Read a commonsense-format file (commonsense_170k.json or a <benchmark>/test.json)."""
    path = Path(path)
    try:
        text = regular_file(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (python data/download.py fetches the public sets)") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_records(text, str(path))


def encode_record(tokenizer, record: dict, cutoff: int = 256) -> tuple[list[int], list[int]]:
    """Token ids and answer-only labels of one training record, as LLM-Adapters' finetune.py makes them:
    BOS + the training text, truncated to `cutoff`, plus EOS when there is room; the first
    len(tokens of the prompt without its output) labels IGNORE_INDEX (upstream's rule, exact for
    LLaMA's tokenizers: the prompt's closing 16 spaces tokenise as one piece alone and as 15 spaces
    then " the" before the output, the same number of pieces)."""
    ids = tokenizer.encode(train_prompt(record), bos=True, eos=False)[:cutoff]
    if len(ids) < cutoff and ids[-1] != tokenizer.eos_id:
        ids.append(tokenizer.eos_id)
    # Clipped to len(ids) so labels always align with ids; upstream's list would come out
    # longer than its ids if the prompt alone tokenised longer than the full text.
    n_prompt = min(len(tokenizer.encode(train_prompt_without_output(record), bos=True, eos=False)), len(ids))
    return ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:]


def answer_start(labels: list[int]) -> int | None:
    """Index of the first trained-on label; None when truncation cut the whole answer off."""
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)


# --------------------------------------------------------------------------------------------
# The cloze form (a departure: train.py --cloze, eval.py --scoring cloze)
#
# Small models rarely learn to bind the protocol's symbols (answer1, answer2, ...) to the choices
# listed before them; the usual way to train and score them is the cloze form, the question then
# the text of a choice, each choice ranked by its log-likelihood. The records stay the protocol's:
# the question and the choices are read off their instruction.

CHOICE_NAME = re.compile(r"(?:^|\s)[A-Z][a-z]+\d+: ")  # "Answer1: ", " Solution2: ", " Option1: ", ...


def cloze_choices(record: dict) -> tuple[str, list[str], list[str]]:
    """(question, the choices' texts, their labels) of a record. The instruction is "<request>:
    <question>\n\n<Name1>: <text> <Name2>: <text> ... Answer format: <label1>/<label2>/..."
    (the choices' separators vary by benchmark); BoolQ's has no choices: they are its labels."""
    head, _, rest = record["instruction"].partition("\n\n")
    listed, _, answer_format = rest.rpartition("Answer format:")
    labels = answer_format.strip().split("/")
    choices = [c.strip() for c in CHOICE_NAME.split(listed.strip())[1:]]
    # Checked here, where the form is parsed: an empty choice has no length to normalise by, and
    # a record whose choices are missing would rank its label names as if they were the choices.
    if not choices and labels != ["true", "false"]:
        raise ValueError(f"no choices listed before its answer format {'/'.join(labels)!r}: it has no cloze form")
    choices = choices or labels
    if len(choices) != len(labels) or not all(choices) or record["answer"] not in labels:
        raise ValueError(f"its choices {choices} do not match its labels {labels} and answer {record['answer']!r}: "
                         "it has no cloze form")
    return head.split(": ", 1)[-1], choices, labels


def cloze_prompt(question: str) -> str:
    """The cloze prompt; a choice continues it as " " + its text."""
    return f"Question: {question}\nAnswer:"


def encode_cloze_record(tokenizer, record: dict, cutoff: int = 256) -> tuple[list[int], list[int]]:
    """Token ids and answer-only labels of a record in the cloze form: BOS, the cloze prompt, the
    correct choice's text, EOS (when the cutoff leaves room)."""
    question, choices, labels = cloze_choices(record)
    prompt = cloze_prompt(question)
    ids = tokenizer.encode(prompt + " " + choices[labels.index(record["answer"])], bos=True, eos=False)[:cutoff]
    if len(ids) < cutoff:
        ids.append(tokenizer.eos_id)
    n_prompt = min(len(tokenizer.encode(prompt, bos=True, eos=False)), len(ids))
    return ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
