"""``iotistic contracts export``: the JSON Schemas of every event version, written to files."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``contracts``' commands and their arguments."""
    contracts = subparsers.add_parser("contracts", help="event contracts")
    ct = contracts.add_subparsers(dest="contracts_command", required=True)
    exp = ct.add_parser("export", help="write the JSON Schemas of every event")
    exp.add_argument(
        "--out", default="contracts/schemas", help="folder to write (default: %(default)s)"
    )
    exp.set_defaults(func=cmd_contracts_export)


def cmd_contracts_export(args: argparse.Namespace) -> int:
    """``iotistic contracts export``: write the JSON Schemas of every event."""
    from contracts.schema import export_schemas

    for path in export_schemas(Path(args.out)):
        Console().print(str(path))
    return 0
