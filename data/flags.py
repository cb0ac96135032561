"""A dataclass as a command line: each field one --flag, with its one-line meaning, its default
and the values it may take, checked when parsed (train.py's Config).

A value outside what a flag allows is a parse error naming the flag, not a traceback minutes
later or a silently wrong run (a negative --grad-clip ascends the gradient); NaN fails every test.
"""

import argparse
import dataclasses
import math

# The values a numeric flag may take (`allowed`): a test and its wording.
POSITIVE, NOT_NEGATIVE = (lambda v: v >= 1, ">= 1"), (lambda v: v >= 0, ">= 0")
SEED = (lambda v: 0 <= v < 2**32, "in [0, 2^32)")  # numpy's and torch's seeds


def flag(default, help: str, *, choices=None, allowed=None, default_text: str = "", infinite: bool = False,
         items=None):
    """A field that is also a command-line flag: its default, its one-line meaning, the values it
    may take (`choices`, or `allowed`; a float is finite unless `infinite`; `items`: a
    comma-separated list, see `list_items`), and how `--help` states a default that means more
    than its value (`default_text`)."""
    return dataclasses.field(default=default, metadata=dict(help=help, choices=choices, allowed=allowed,
                                                            default_text=default_text, infinite=infinite,
                                                            items=items))


def block_number(text: str) -> int:
    """A 1-based block number of a list flag (--echo-source-layers 4,1)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


# The items of a comma-separated flag: (parse, what an item is).
BLOCK_NUMBERS, NAMES = (block_number, "a block number (an integer >= 1)"), (str, "a name")


def list_items(flag_name: str, text: str, items) -> list:
    """A comma-separated flag's items, each parsed by `items`, none empty and none given twice:
    the rule of every list flag (a block listed twice is weighted twice, a --data file listed
    twice validates on its own training records), so nothing is silently dropped or doubled.
    A bad item is a ValueError naming the flag."""
    parse, what = items
    values = []
    for item in text.split(","):
        try:
            values.append(parse(item.strip()) if item.strip() else None)
        except ValueError:
            values.append(None)
        if values[-1] is None:
            raise ValueError(f"{flag_name} {text}: {item!r} is not {what}")
    twice = [str(v) for v in dict.fromkeys(values) if values.count(v) > 1]
    if twice:
        raise ValueError(f"{flag_name} {text}: gives {', '.join(twice)} more than once")
    return values


def finite(text: str) -> float:
    """A float flag's value: NaN and infinity are parse errors naming the flag, not a NaN loss
    blamed on --lr steps later."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def flag_help(f: dataclasses.Field, presets: dict[str, dict]) -> str:
    """`--help`'s line for a field: its meaning, its default (and each preset's, where a preset
    sets another) and, for numbers, the values it may take."""
    meta = f.metadata
    default = meta["default_text"] or ("off" if f.type is bool else f.default)
    text = f"{meta['help']} (default: {default}"
    for name, preset in presets.items():
        if f.name in preset:
            text += f"; with --ckpt {name}: {preset[f.name]}"
    if meta["allowed"]:
        text += f"; {meta['allowed'][1]}"
    return (text + ")").replace("%", "%%")  # argparse formats help with %


def dataclass_parser(config_class, presets: dict[str, dict], description: str) -> argparse.ArgumentParser:
    """One flag per field of `config_class`: --name-with-dashes. Unset flags parse to None (False
    for a switch), so that what was given can be told apart from the defaults and presets."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    for f in dataclasses.fields(config_class):
        flag_name, help = "--" + f.name.replace("_", "-"), flag_help(f, presets)
        if f.type is bool:
            parser.add_argument(flag_name, action="store_true", help=help)
        else:
            kind = finite if f.type is float and not f.metadata["infinite"] else f.type
            parser.add_argument(flag_name, type=kind, default=None, choices=f.metadata["choices"], help=help)
    return parser


def given_flags(parser: argparse.ArgumentParser, argv) -> dict:
    """What was given on the command line (`0` is a value; unset is None, or False for a switch)."""
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None and v is not False}


def check_allowed(parser: argparse.ArgumentParser, config):
    """Every field's value within its `allowed` values, or a parse error naming the flag."""
    for f in dataclasses.fields(config):
        if f.metadata["items"] and getattr(config, f.name):
            try:
                list_items(f"--{f.name.replace('_', '-')}", getattr(config, f.name), f.metadata["items"])
            except ValueError as e:
                parser.error(str(e))
        ok, allowed = f.metadata["allowed"] or (None, "")
        if ok and not ok(getattr(config, f.name)):
            parser.error(f"--{f.name.replace('_', '-')} must be {allowed}, found {getattr(config, f.name)}")
