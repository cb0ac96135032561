"""Reading and writing the project's files, torch-free: the bottom of the import chain.

    data/ (files, commonsense) <- tokenizer <- llama <- echo_lora <- train, eval <- bench

Every module above reads its JSON and writes its outputs through these helpers, and the data/
scripts use them without importing the model or torch.
"""

import json
import os
import stat
import subprocess
import types
from pathlib import Path

# ---- reading: only regular files, only names inside the folder that names them


def regular_file(path) -> Path:
    """`path`, checked to be a regular file (after symlinks) before anything opens it: a FIFO
    or a device would block or stream forever, a folder fails obscurely. Missing: a
    FileNotFoundError; anything else: a ValueError naming the file."""
    path = Path(path)
    mode = path.stat().st_mode  # FileNotFoundError (an OSError) for a missing file
    if not stat.S_ISREG(mode):
        kind = "folder" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "device or socket"
        raise ValueError(f"{path}: a {kind}, not a regular file: not read")
    return path


def read_bytes(path) -> bytes:
    return regular_file(path).read_bytes()


def read_json(path) -> dict:
    """The JSON in `path`; an unreadable or non-regular file, or bad JSON (NaN or Infinity,
    nesting too deep, a number of thousands of digits included), is a ValueError naming the file."""
    path = Path(path)
    try:
        text = regular_file(path).read_text(encoding="utf-8")
        return json.loads(text, parse_constant=refuse_constant)
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: cannot read JSON: {e}") from None
    except ValueError as e:  # JSONDecodeError, the digit limit of int(), refuse_constant; regular_file's own
        raise ValueError(str(e) if str(e).startswith(str(path)) else f"{path}: cannot read JSON: {e}") from None


def refuse_constant(name: str):
    """json.loads takes NaN and Infinity, which JSON has not: no file of ours holds them."""
    raise ValueError(f"{name} is not a JSON number")


def inside(folder, name, source) -> Path:
    """folder/name, for a file name that `source` (a file) gives: relative, and inside `folder`
    once `..` is resolved, or a ValueError naming `source`. Checked on the name, not through
    symlinks: a link the folder's owner put there (as HF's cache does) is the folder's own."""
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise ValueError(f"{source}: {json.dumps(name)} is not a file name")
    if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] in (os.pardir, os.curdir):
        raise ValueError(f"{source}: {name!r} is not a name inside {folder}: refused")
    return Path(folder) / os.path.normpath(name)


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
