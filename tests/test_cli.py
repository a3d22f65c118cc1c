"""Every command answers --help, and errors a user can act on are one line without a traceback."""

from __future__ import annotations

import argparse

import pytest

from medfusion.cli import build_parser, main, parse_args


def _commands(parser: argparse.ArgumentParser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _commands(sub, (*prefix, name))


COMMANDS = sorted(set(_commands(build_parser())))


def test_the_expected_commands_exist():
    for cmd in [
        ("store", "up"),
        ("store", "down"),
        ("store", "status"),
        ("data", "synth"),
        ("data", "ingest"),
        ("data", "inspect"),
        ("bench", "ingest"),
        ("evaluate",),
        ("serve",),
        ("bench", "serve"),
        ("pipeline", "run"),
        ("pipeline", "compile"),
        ("pipeline", "submit"),
        ("train",),
        ("bench", "train"),
        ("demo",),
        ("models", "list"),
        ("models", "show"),
        ("models", "register"),
    ]:
        assert cmd in COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: medfusion" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "synth", "--out", "/tmp/x", "synth.num_samples=-1"], "synth.num_samples: must be > 0"),
        (["data", "synth", "--out", "/tmp/x", "synth.nope=1"], "synth.nope: unknown field"),
        (["data", "inspect", "/nonexistent/dataset"], "no dataset here"),
        (
            ["data", "ingest", "--source", "manifest", "--input", "/nonexistent.csv", "--out", "/tmp/y"],
            "nonexistent.csv",
        ),
    ],
)
def test_errors_are_one_actionable_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_overrides_may_stand_on_both_sides_of_options(capsys):
    args = parse_args(["tune", "--preset", "tiny", "name=a", "--seeds", "3", "num_samples=6", "train.epochs=4"])
    assert args.overrides == ["name=a", "num_samples=6", "train.epochs=4"] and args.seeds == 3
    with pytest.raises(SystemExit):
        parse_args(["tune", "name=a", "--seeds", "3", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
