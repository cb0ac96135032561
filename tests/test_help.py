"""`--help` of train.py, eval.py and bench.py: every flag says what it means, its default and the
values it takes; and train.py's stated defaults are the ones a run really uses."""

import argparse
import dataclasses

import pytest

import bench
import eval as evaluator
import train
from echo_lora import EchoConfig


class Parsed(Exception):
    """Raised instead of parsing: carries the parser a script's entry point built."""


def parser_of(entry_point, monkeypatch) -> argparse.ArgumentParser:
    def capture(parser, *args, **kwargs):
        raise Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Parsed) as parsed:
        entry_point([])
    return parsed.value.args[0]


@pytest.mark.parametrize("entry_point", [train.parse_config, evaluator.parse_args, bench.main],
                         ids=["train", "eval", "bench"])
def test_every_flag_has_a_meaning_a_default_and_its_choices(entry_point, monkeypatch):
    parser = parser_of(entry_point, monkeypatch)
    text = parser.format_help()
    flags = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert len(flags) >= 15
    for action in flags:
        name = action.option_strings[0]
        assert action.help and len(action.help) > 20, f"{name}: no help"
        assert "default" in action.help or "required" in action.help, f"{name}: its default is not stated"
        if action.choices:
            assert "{" + ",".join(map(str, action.choices)) + "}" in text, f"{name}: its choices are not shown"


def help_line(parser, name: str) -> str:
    return next(a.help for a in parser._actions if a.dest == name) % {}  # argparse's own %-formatting


def test_train_help_states_the_defaults_a_run_uses(monkeypatch):
    """The default each line of `train.py --help` states is the value parse_config gives a run that
    does not set the flag: for a named checkpoint, and for the embedded tiny model's presets."""
    parser = parser_of(train.parse_config, monkeypatch)
    monkeypatch.undo()
    llama_run, tiny_run = train.parse_config(["--ckpt", "llama-7b", "--device", "cpu"]), train.parse_config([])
    stated_in_words = {"out", "lr", "device", "precision", "echo_source_layers", "echo_target_layers"}
    for f in dataclasses.fields(train.Config):
        line = help_line(parser, f.name)
        if f.name not in stated_in_words:
            value = getattr(tiny_run if f.name == "ckpt" else llama_run, f.name)
            assert f"(default: {'off' if value is False else value}" in line, f"--{f.name}: {line}"
        if getattr(tiny_run, f.name) != getattr(llama_run, f.name) and f.name not in ("ckpt", "out", "device"):
            assert f"with --ckpt tiny: {getattr(tiny_run, f.name)}" in line, f"--{f.name}: {line}"
    assert "--method {lora,dora,echo-lora,echo-dora}" in parser.format_help()


def test_echo_flags_default_to_echo_config_and_take_what_it_accepts():
    """The --echo-* flags are EchoConfig's fields: left unset they give EchoConfig's defaults, and
    each choice --help offers reaches EchoConfig as given (any other is a parse error)."""
    assert train.echo_config(train.parse_config(["--ckpt", "llama-7b"])) == EchoConfig()
    names = {f.name: train.echo_flag_name(f.name) for f in dataclasses.fields(EchoConfig)}
    assert set(names.values()) == {f.name for f in dataclasses.fields(train.Config) if f.name.startswith("echo_")}
    for field_name, flag in names.items():
        choices = train.Config.__dataclass_fields__[flag].metadata["choices"]
        option = "--" + flag.replace("_", "-")
        for value in choices or ():  # --echo-pass full: --echo-mask none needs it
            cfg = train.parse_config(["--echo-pass", "full", option, value])
            assert getattr(train.echo_config(cfg), field_name) == value
        if choices:
            with pytest.raises(SystemExit):
                train.parse_config([option, "something-else"])
