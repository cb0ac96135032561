"""The published LoRA and DoRA rows (r = 32) of the commonsense table, and the rule for printing
one beside a run: only when the run followed the row's protocol, else a note saying what differs.
"""

import math
from pathlib import Path


# Accuracy (%) on the eight benchmarks in BENCHMARKS order, then the average. Copied verbatim
# from NVlabs/DoRA, commonsense_reasoning/README.md, the three "Accuracy comparison of LoRA and
# DoRA ..." tables, rows with r = 32 (the LLaMA-7B DoRA r = 32 row lists lr 1e-4 there).
PUBLISHED = {
    "llama-7b": {
        "LoRA r=32": (67.5, 80.8, 78.2, 83.4, 80.4, 78.0, 62.6, 79.1, 76.3),
        "DoRA r=32": (69.7, 83.4, 78.6, 87.2, 81.0, 81.9, 66.2, 79.2, 78.4),
    },
    "llama2-7b": {
        "LoRA r=32": (69.8, 79.9, 79.5, 83.6, 82.6, 79.8, 64.7, 81.0, 77.6),
        "DoRA r=32": (71.8, 83.7, 76.0, 89.1, 82.6, 83.7, 68.2, 82.4, 79.7),
    },
    "llama3-8b": {
        "LoRA r=32": (70.8, 85.2, 79.9, 91.7, 84.3, 84.2, 71.2, 79.0, 80.8),
        "DoRA r=32": (74.6, 89.3, 79.9, 95.5, 85.6, 90.5, 80.4, 85.8, 85.2),
    },
}


# The settings every published row was produced under, and each row's learning rate (the "lr"
# column beside it in the same README tables). A row is printed beside a run only when the run
# matches them all (published_rows).
PUBLISHED_PROTOCOL = dict(num_beams=4, max_new_tokens=32, beam_rule="transformers-4.36", r=32)


PUBLISHED_LR = {"LoRA r=32": {"llama-7b": 3e-4, "llama2-7b": 3e-4, "llama3-8b": 3e-4},
                "DoRA r=32": {"llama-7b": 1e-4, "llama2-7b": 2e-4, "llama3-8b": 1e-4}}


# train.py's departures from the recipe (all off in the recipe), as they read in a results note.
TRAIN_DEPARTURES = {"answer_only_loss": "answer-only loss", "token_mean_loss": "loss averaged over the step's tokens",
                    "group_by_length": "length-grouped batches", "adapter_only_dropout": "adapter-only DoRA dropout",
                    "cloze": "cloze-form training"}

# The weights' dtype the protocol evaluates in: LLM-Adapters' and DoRA's commonsense_evaluate.py
# load with torch_dtype=torch.float16, then model.half().
PROTOCOL_PRECISION = "fp16"


def default_lr(method: str, ckpt: str) -> float:
    """The recipe's rates: 3e-4 for LoRA; for DoRA the published r = 32 row's rate of the base
    model (PUBLISHED_LR: 1e-4 LLaMA-7B, 2e-4 Llama-2-7B, 1e-4 Llama-3-8B), else
    2e-4 (DoRA's other rows)."""
    if "dora" not in method:
        return 3e-4
    name = Path(ckpt).name.lower().replace("-", "").replace("_", "")
    dora_rates = PUBLISHED_LR["DoRA r=32"]  # keyed llama-7b, llama2-7b, llama3-8b
    return next((lr for key, lr in dora_rates.items() if key.replace("-", "") in name), 1e-4 if "llama3" in name else 2e-4)


def default_published(ckpt: str) -> str:
    """The published rows for the checkpoint's folder name, when it is one of PUBLISHED's."""
    name = Path(ckpt).name.lower()
    return name if name in PUBLISHED else "none"


def protocol_differences(args, trained: dict | None, row_lr: float) -> list[str]:
    """How this evaluation, and the training run behind its adapter, depart from a published
    row's protocol (PUBLISHED_PROTOCOL and the row's lr); [] when they match."""
    differs = []
    if args.scoring != "generate":
        differs.append(f"{args.scoring} ranking instead of generation")
    for name in ("num_beams", "max_new_tokens", "beam_rule"):
        if getattr(args, name) != PUBLISHED_PROTOCOL[name]:
            differs.append(f"{name.replace('_', '-')} {getattr(args, name)} (row: {PUBLISHED_PROTOCOL[name]})")
    if args.precision != PROTOCOL_PRECISION:
        differs.append(f"{args.precision} weights (row: {PROTOCOL_PRECISION})")
    if args.limit:
        differs.append(f"only the first {args.limit} items of each test set")
    if args.adapter is None:
        return differs + ["the base model, no adapter"]
    if trained is None:
        return differs + ["training settings unknown (no train.py config.json beside the adapter)"]
    if trained.get("r") != PUBLISHED_PROTOCOL["r"]:
        differs.append(f"r {trained.get('r')} (row: {PUBLISHED_PROTOCOL['r']})")
    if not math.isclose(trained.get("lr", 0.0), row_lr):
        differs.append(f"lr {trained.get('lr', 0.0):g} (row: {row_lr:g})")
    if "train_on_inputs" in trained and not trained["train_on_inputs"]:  # written before answer_only_loss
        trained = {**trained, "answer_only_loss": True}
    differs += [text for flag, text in TRAIN_DEPARTURES.items() if trained.get(flag)]
    return differs


def published_rows(args, trained: dict | None) -> tuple[dict[str, tuple], list[str]]:
    """The published rows to print beside this run (those whose protocol it matches), and a note
    for each row left out saying what differs."""
    rows, notes = {}, []
    for name, accuracies in PUBLISHED.get(args.published, {}).items():
        differs = protocol_differences(args, trained, PUBLISHED_LR[name][args.published])
        if differs:
            notes.append(f"- {name} (published) not shown: this run differs from its protocol in "
                         f"{'; '.join(differs)}.")
        else:
            rows[name] = accuracies
    return rows, notes
