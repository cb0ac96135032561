"""Reading and writing the project's files, torch-free: the bottom of the import chain, whose
order tests/test_layers.py states and checks.

Every module above reads its JSON and writes its outputs through these helpers, and the data/
scripts use them without importing the model or torch.
"""

import fcntl
import json
import os
import shlex
import stat
import subprocess
import tempfile
import types
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

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


# ---- shapes: one small checker per file format, run where the file is read
#
# A shape is: a type (`int`, `float`, `str`, `bool`, `None`; a float may be written as an int, a
# bool is never a number) or a union of them (`int | None`); a tuple of shapes, any one of which
# fits; `{key: shape}`, an object whose keys are required unless they end in "?", and with a
# `str` key, the shape of every other key's value; `[shape]`, a list of them; or
# `Rule(shape, test, "what it must be")`. Keys a shape does not name are left alone.


class Rule(NamedTuple):
    shape: object
    test: object
    allowed: str


def check_shape(source, value, shape, where: str = ""):
    """`value` (read from `source`) has `shape`, or a ValueError names the file, the key and
    what it must be: a value of the wrong type fails here, one line, not deep in a later use."""
    def wrong(expected):
        found = json.dumps(value, default=str)
        return ValueError(f"{source}: {repr(where) + ' is' if where else 'holds'} "
                          f"{found if len(found) < 80 else found[:76] + ' ...'}, expected {expected}")

    at = lambda key: f"{where}/{key}" if where else str(key)  # noqa: E731
    if isinstance(shape, Rule):
        check_shape(source, value, shape.shape, where)
        if not shape.test(value):
            raise wrong(shape.allowed)
    elif isinstance(shape, tuple):
        errors = []
        for option in shape:
            try:
                return check_shape(source, value, option, where)
            except ValueError as e:
                inner = option.shape if isinstance(option, Rule) else option
                if isinstance(inner, (dict, list)) and isinstance(value, type(inner)):
                    errors.append(e)  # the form the value has: its own error says what is wrong inside
        if len(errors) == 1:
            raise errors[0]
        raise wrong(" or ".join(shape_name(option) for option in shape))
    elif isinstance(shape, list):
        if not isinstance(value, list):
            raise wrong("a list")
        for i, item in enumerate(value):
            check_shape(source, item, shape[0], at(i))
    elif isinstance(shape, dict):
        if not isinstance(value, dict):
            raise wrong("an object")
        named = {key.rstrip("?"): (sub, key.endswith("?")) for key, sub in shape.items() if key is not str}
        missing = [key for key, (_, optional) in named.items() if not optional and key not in value]
        if missing:
            raise ValueError(f"{source}: {repr(where) + ' ' if where else ''}has no {', '.join(map(repr, missing))}")
        for key, item in value.items():
            sub = named[key][0] if key in named else shape.get(str)
            if sub is not None:
                check_shape(source, item, sub, at(key))
    else:
        allowed = tuple(type(None) if t is None else t for t in (shape.__args__ if isinstance(shape, types.UnionType)
                                                                 else (shape,)))
        allowed += (int,) if float in allowed else ()
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise wrong(shape_name(shape))
    return value


def shape_name(shape) -> str:
    if isinstance(shape, Rule):
        return shape.allowed
    if isinstance(shape, (dict, list, tuple)):
        return {dict: "an object", list: "a list", tuple: "one of several forms"}[type(shape)]
    options = shape.__args__ if isinstance(shape, types.UnionType) else (shape,)
    names = {None: "null", type(None): "null", dict: "an object", list: "a list"}
    return " or ".join(names.get(t) or t.__name__ for t in options)


def check_json_types(path: Path, values: dict, expected: dict):
    """Each present key of `values` has its `expected` type (a type, or a union such as
    `int | None`): check_shape with every key optional."""
    check_shape(path, values, {key + "?": annotation for key, annotation in expected.items()})


def read_json_shaped(path, shape):
    """read_json, then check_shape: what every reader of a JSON file of ours calls."""
    return check_shape(path, read_json(path), shape)


# ---- writing: atomic files, output folders checked first, a run folder one process's


def write_atomically(file: Path, write):
    """Write through a temporary file and rename it over `file`, so an interrupted save never
    leaves a half-written file where a good one was. The temporary file is created exclusively
    under a fresh name (never a fixed one, where a planted symlink would redirect the write),
    with the permissions a plain new file gets."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        os.close(fd)
        try:
            write(tmp)
        except RuntimeError as e:  # torch.save's word for a failed write (a full disk): an OSError naming the file
            raise OSError(f"{file}: cannot write: {str(e).splitlines()[0]}") from None
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)  # only left over when the write failed


def output_folder(path, flag: str = "--out") -> Path:
    """`path` as an output folder, checked before any work is done: an existing file there (or
    above it), or a place this process may not write, is a ValueError naming the flag."""
    path = Path(path)
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {existing} is not writable")
    return path


LOCK_FILE = ".lock"


@contextmanager
def locked_folder(folder: Path):
    """`folder` (made if missing) held by this process alone while the block runs: an exclusive
    flock on folder/.lock, which the system drops when the process ends however it ends, so a
    killed run leaves no stale lock. Held by another process: a ValueError naming the folder."""
    folder = output_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{folder}: another process is writing a run there (it holds {folder / LOCK_FILE}); "
                             "wait for it to end, or give another --out") from None
        yield folder
    finally:
        os.close(fd)


# ---- train.py's run record: what makes a folder a run

# The key only train.py's config.json holds: a folder is a run when its config.json has it (an HF
# model folder's config.json, or any other, does not make it one).
RUN_MARKER = "echo_lora_run"


def read_run_record(folder) -> dict | None:
    """train.py's record of the run in `folder` (its config.json), or None when there is none or
    the config.json there is another program's; one that cannot be read is read_json's error."""
    file = Path(folder) / "config.json"
    if not file.exists():
        return None
    record = read_json(file)
    if not (isinstance(record, dict) and record.get(RUN_MARKER) == 1):
        return None
    return check_shape(file, record, RUN_RECORD)


# A run record's shape: the flags its readers use (eval.py, the experiment's table, --resume).
RUN_RECORD = {"config": {"method": str, "seed": int, "ckpt?": str, "data?": str, "echo_inject?": str, "lr?": float,
                         "max_steps?": int, str: (str, float, bool, None)},
              "train_records?": int, "model_args?": dict}


ROOT = Path(__file__).resolve().parents[1]  # the repository


def code_version() -> dict:
    """The git commit this code is at, and whether its files differ from it (None outside a git
    checkout): what a run's numbers can be traced back to."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": None, "modified": None}
    return {"git_commit": commit.stdout.strip(), "modified": bool(status.stdout.strip())}


def recorded_path(path) -> str:
    """`path` as a run's files record it: relative to the repository when it lies inside it, so
    committed results name no folder of the machine that made them; as given otherwise."""
    try:
        return Path(path).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def recorded_command(argv: list[str]) -> str:
    """A command line as a run's files record it: its absolute paths inside the repository made
    relative (recorded_path), every other argument as typed."""
    return shlex.join(recorded_path(arg) if os.path.isabs(arg) else arg for arg in argv)


def output_files(suffix: str) -> tuple[str, str, str]:
    """eval.py's files for a scoring (suffix "", "-likelihood" or "-cloze"), in the order they are written:
    predictions, results.md, then results.json, which records the predictions' SHA-256 and, being
    last, marks the evaluation finished."""
    return f"predictions{suffix}.jsonl", f"results{suffix}.md", f"results{suffix}.json"


EVAL_FILES = output_files("") + output_files("-likelihood") + output_files("-cloze")  # train.py --overwrite removes these by name
