"""Reading and writing the project's files, torch-free: the bottom of the import chain.

    data/ (files, commonsense) <- tokenizer <- llama <- echo_lora <- train, eval <- bench

Every module above reads its JSON and writes its outputs through these helpers, and the data/
scripts use them without importing the model or torch.
"""

import json
import os
import subprocess
import types
from pathlib import Path


def read_json(path: Path) -> dict:
    """The JSON in `path`; an unreadable file or bad JSON is a ValueError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON: {e}") from None


def check_json_types(path: Path, values: dict, expected: dict):
    """Each present key of `values` has its `expected` type (a type, or a union such as
    `int | None`): a string where a number belongs would otherwise fail later, far from the
    file. An int is a float here, as JSON writes 1e4 as 10000; a bool is never an int."""
    for key, annotation in expected.items():
        if key not in values:
            continue
        allowed = annotation.__args__ if isinstance(annotation, types.UnionType) else (annotation,)
        allowed = tuple(t for t in allowed if isinstance(t, type))
        if float in allowed:
            allowed += (int,)
        value = values[key]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed if t is not int or float not in allowed)
            raise ValueError(f"{path}: {key!r} is {json.dumps(value)}, expected {names}")


def write_atomically(file: Path, write):
    """Write through a temporary file and rename it over `file`, so an interrupted save never
    leaves a half-written file where a good one was."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)  # only left over when the write failed


def code_version() -> dict:
    """The git commit this code is at, and whether its files differ from it (None outside a git
    checkout): what a run's numbers can be traced back to."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": None, "modified": None}
    return {"git_commit": commit.stdout.strip(), "modified": bool(status.stdout.strip())}
