"""``iotistic parked``: the events projections could not apply, and the operator's decision
on each (skip it, or retry it); the running projection picks the decision up."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import asyncpg
from rich.console import Console
from rich.table import Table

from libs.config import ServiceSettings
from libs.projections.parking import decide, open_parked
from services.cli.environment import console, settings_from
from services.targets import CONTROL_PLANE

COLUMNS = ("service", "projection", "seq", "event_type", "error", "attempts", "decision")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``parked``'s commands and their arguments."""
    parked = subparsers.add_parser("parked", help="events projections could not apply")
    pk = parked.add_subparsers(dest="parked_command", required=True)
    pk.add_parser("list", help="open parked events of every service").set_defaults(
        func=cmd_parked_list
    )
    for decision in ("skip", "retry"):
        p = pk.add_parser(decision, help=f"{decision} a parked event; the projection resumes")
        p.add_argument("service", choices=sorted(CONTROL_PLANE), help="the projection's service")
        p.add_argument("projection", help="the projection's name (`iotistic parked list`)")
        p.add_argument("seq", type=int, help="the parked event's stream sequence")
        p.set_defaults(func=cmd_parked_decide, decision=decision)


async def _service_conn(settings: ServiceSettings, schema: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        settings.database_url, server_settings={"search_path": f"{schema},public"}
    )


def cmd_parked_list(args: argparse.Namespace) -> int:
    """``iotistic parked list``: open parked events of every service."""
    settings = settings_from(args, needs=("DATABASE_URL",))

    async def go() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for name in CONTROL_PLANE:
            conn = await _service_conn(settings, name)
            try:
                exists = await conn.fetchval("SELECT to_regclass('parked_events') IS NOT NULL")
                if exists:
                    found += [{"service": name, **row} for row in await open_parked(conn)]
            finally:
                await conn.close()
        return found

    rows = asyncio.run(go())
    out = Console()
    if not rows:
        out.print("no parked events")
        return 0
    table = Table(title="parked events (the projection waits at each)")
    for column in COLUMNS:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row.get(c) or "") for c in COLUMNS))
    out.print(table)
    return 0


def cmd_parked_decide(args: argparse.Namespace) -> int:
    """``iotistic parked skip|retry``: record the operator's decision."""
    settings = settings_from(args, needs=("DATABASE_URL",))

    async def go() -> bool:
        conn = await _service_conn(settings, args.service)
        try:
            return await decide(conn, args.projection, args.seq, args.decision)
        finally:
            await conn.close()

    if not asyncio.run(go()):
        console.print(f"no open parked event {args.projection}@{args.seq} in {args.service}")
        return 1
    Console().print(
        f"{args.decision}: {args.service}/{args.projection} seq {args.seq}; the running "
        "projection picks the decision up within a second"
    )
    return 0
