"""`iotistic --help` explains every command and flag: each subcommand opens with a line of what
it does, each argument says what it is, and no raw markup reaches the terminal."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from services.cli.main import build_parser


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                yield from commands(subparser, (*path, name))


def test_every_command_and_argument_is_explained() -> None:
    undescribed, unexplained = [], []
    found = list(commands(build_parser()))
    assert len(found) > 20  # the walk reaches the nested commands
    for path, parser in found:
        if path and not parser.description:
            undescribed.append(" ".join(path))
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            if not action.help:
                unexplained.append(f"{' '.join(path)} {action.option_strings or action.dest}")
    assert undescribed == [] and unexplained == [], (undescribed, unexplained)


def test_the_help_is_plain_text_and_shows_the_defaults() -> None:
    script = Path(sys.executable).parent / "iotistic"
    top = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert top.returncode == 0 and "``" not in top.stdout, top.stdout
    up = subprocess.run([str(script), "up", "--help"], capture_output=True, text=True, timeout=60)
    assert "default: 8080" in up.stdout and "--data-dir" in up.stdout, up.stdout
