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
        write(tmp)
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
    return record if isinstance(record, dict) and record.get(RUN_MARKER) == 1 else None


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
