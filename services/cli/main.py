"""The entry point of the ``iotistic`` console script: the parser, assembled from each command
group's ``add_parser``, and how a command's errors become exit codes (2: configuration,
1: a server unreachable or refusing, 130: interrupted)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import asyncpg

from libs.config import ConfigError
from libs.db.postgres import CONNECTION_ERRORS
from libs.eventlog.bus_auth import BusAuthError
from libs.eventlog.connection import NATS_ERRORS
from libs.eventlog.errors import EventStoreError
from libs.observability.logs import configure_logging
from services.cli import (
    archives,
    bus,
    contracts,
    erase,
    events,
    mail,
    parked,
    provisioner,
    replay,
    run,
    simulate,
    up,
)
from services.cli.environment import console
from services.licensing.keys import KeyConfigError

DEFAULT_DATA_DIR = ".iotistic"

# In the order `iotistic --help` lists them.
GROUPS = (
    run,
    up,
    replay,
    events,
    mail,
    bus,
    parked,
    provisioner,
    erase,
    simulate,
    archives,
    contracts,
)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``iotistic`` console script."""
    args = build_parser().parse_args(argv)
    setup_logging(args.command)
    try:
        code = args.func(args)
    except (ConfigError, KeyConfigError, BusAuthError) as exc:
        console.print(f"[red]configuration error:[/red] {exc}")
        code = 2
    except KeyboardInterrupt:
        code = 130
    except (*NATS_ERRORS, *CONNECTION_ERRORS, asyncpg.PostgresError, EventStoreError) as exc:
        # An unreachable or refusing server is the operator's to fix: say which, no traceback.
        console.print(f"[red]error:[/red] {server_error_line(exc)}")
        code = 1
    sys.exit(code or 0)


# JetStream's codes for "no room to store it": insufficient resources, storage resources
# exceeded, and a consumer store that could not be created; a server may send that last one
# as a general consumer-creation error (10012), so its words are matched too.
_JETSTREAM_STORAGE_FULL = {10023, 10047, 10104}
_STORAGE_FULL_WORDS = ("no space left on device", "creating store", "insufficient")


def server_error_line(exc: BaseException) -> str:
    """One line for an error a server gave; a NATS server out of disk is named as such."""
    err_code = getattr(exc, "err_code", None)
    description = str(getattr(exc, "description", None) or exc)
    if err_code in _JETSTREAM_STORAGE_FULL or any(
        words in description.lower() for words in _STORAGE_FULL_WORDS
    ):
        # Reads that make a consumer (export, tail, replay) need a little of its disk.
        return (
            "the NATS server has no room to store what this command needs (its JetStream disk "
            f"or storage limit is full): free space there and try again ({description})"
        )
    return f"{type(exc).__name__}: {exc}"


def setup_logging(command: str) -> None:
    """The process's logging: one escaped line per record, uvicorn's included.

    See ``libs.observability.logs``.
    """
    # Servers log what they do; the operator's one-shot commands only what went wrong.
    quiet = "WARNING" if command not in ("run", "up") else "INFO"
    configure_logging(os.environ.get("LOG_LEVEL", quiet))


def build_parser() -> argparse.ArgumentParser:
    """``iotistic``'s arguments: the global ``--data-dir``, then each group's commands."""
    parser = argparse.ArgumentParser(
        prog="iotistic",
        description="Iotistic's command: bring the platform up on one machine, run one service "
        "against your Postgres and NATS, replay and look at the event log, and the "
        "provisioner's and the bus's tools. `iotistic <command> --help` says more.",
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("IOTISTIC_DATA_DIR", DEFAULT_DATA_DIR),
        help="folder of the embedded platform (default: %(default)s); other commands read the "
        "URLs of a running `iotistic up` from it when DATABASE_URL/NATS_URL are not set",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_parser(subparsers)
    _describe(parser)
    return parser


def _describe(parser: argparse.ArgumentParser) -> None:
    """Every subcommand's --help opens with its one-line help where it has no description."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, subparser in action.choices.items():
                if subparser.description is None and helps.get(name):
                    subparser.description = str(helps[name])
                _describe(subparser)
