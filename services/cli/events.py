"""``iotistic events``: follow the log, export a range of it, count it by type, and make the
stream (or bring it to the ``EVENTS_*`` settings) as the bus's operator."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from contracts import MalformedEvent, decode_envelope
from libs.eventlog.reader import StoredMessage
from libs.eventlog.store import EventStore
from services.cli.environment import console, settings_from
from services.cli.event_log import event_log, operator_connection


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``events``' commands and their arguments."""
    events = subparsers.add_parser("events", help="look at the event log")
    ev = events.add_subparsers(dest="events_command", required=True)
    tail = ev.add_parser("tail", help="follow the log as events arrive")
    tail.add_argument("--from-seq", type=int, help="start here instead of at the end")
    tail.add_argument("--type", action="append", dest="types", help="only this event type")
    tail.add_argument("--json", action="store_true", help="print whole envelopes")
    tail.set_defaults(func=cmd_events_tail)
    export = ev.add_parser("export", help="export a range of the log as JSON lines")
    export.add_argument(
        "--from-seq", type=int, default=1, help="first stream sequence (default: %(default)s)"
    )
    export.add_argument("--to-seq", type=int, help="last stream sequence (default: the head)")
    export.add_argument("--type", action="append", dest="types", help="only this event type")
    export.add_argument("--output", "-o", help="file to write (default: standard output)")
    export.set_defaults(func=cmd_events_export)
    init = ev.add_parser(
        "init",
        help="create the event stream, or bring it to the EVENTS_* settings (as the operator)",
    )
    init.set_defaults(func=cmd_events_init)
    stats = ev.add_parser("stats", help="event counts per type")
    stats.add_argument("--json", action="store_true", help="the counts as JSON")
    stats.set_defaults(func=cmd_events_stats)


def describe(stored: StoredMessage) -> dict[str, Any]:
    """A stored message as JSON-ready data: its envelope, or why it is malformed."""
    base: dict[str, Any] = {"seq": stored.seq, "subject": stored.subject}
    try:
        envelope = decode_envelope(stored.data)
    except MalformedEvent as exc:
        return {**base, "malformed": str(exc), "raw": stored.data.decode(errors="replace")}
    del envelope  # decoded only to tell a valid envelope from a malformed one
    return {**base, "envelope": json.loads(stored.data)}


def cmd_events_tail(args: argparse.Namespace) -> int:
    """``iotistic events tail``: print events as they are appended."""
    settings = settings_from(args, needs=("NATS_URL",))
    out = Console()

    async def go() -> None:
        async with event_log(settings) as store:
            start = args.from_seq or await store.last_seq() + 1
            async for stored in store.read(from_seq=start, event_types=args.types, follow=True):
                item = describe(stored)
                if args.json:
                    print(json.dumps(item, default=str), flush=True)
                    continue
                env = item.get("envelope")
                if env is None:
                    out.print(f"{stored.seq:>8}  [red]malformed[/red] {stored.subject}")
                else:
                    out.print(
                        f"{stored.seq:>8}  {env['occurred_at']}  {env['type']:<22} "
                        f"customer={env['customer_id']}  id={env['event_id']}"
                    )

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(go())
    return 0


def cmd_events_export(args: argparse.Namespace) -> int:
    """``iotistic events export``: a range of the log as JSON lines."""
    settings = settings_from(args, needs=("NATS_URL",))

    async def go(handle: TextIO) -> int:
        count = 0
        async with event_log(settings) as store:
            async for stored in store.read(
                from_seq=args.from_seq, to_seq=args.to_seq, event_types=args.types
            ):
                handle.write(json.dumps(describe(stored), default=str) + "\n")
                count += 1
        return count

    if args.output:
        with open(args.output, "w") as handle:
            count = asyncio.run(go(handle))
    else:
        count = asyncio.run(go(sys.stdout))
    console.print(f"exported {count} events")
    return 0


def cmd_events_init(args: argparse.Namespace) -> int:
    """``iotistic events init``: make the stream (services may not), or update its settings."""
    settings = settings_from(args, needs=("NATS_URL",))

    async def go() -> Any:
        nc = await operator_connection(settings)
        try:
            return await EventStore(nc.jetstream(), settings).ensure_stream()
        finally:
            await nc.close()

    info = asyncio.run(go())
    Console().print(
        f"stream {info.config.name}: subjects {', '.join(info.config.subjects or [])}, "
        f"{info.config.num_replicas} replica(s), {info.state.messages} events"
    )
    return 0


def cmd_events_stats(args: argparse.Namespace) -> int:
    """``iotistic events stats``: how many events of each type the log holds."""
    settings = settings_from(args, needs=("NATS_URL",))

    async def go() -> dict[str, Any]:
        async with event_log(settings) as store:
            # Stream info only: a reader (a consumer) would need the server's disk.
            first_seq, last_seq, by_subject = await store.subject_counts()
            counts: dict[str, int] = {}
            for subject, n in by_subject.items():
                event_type = StoredMessage(0, subject, b"", {}).event_type
                counts[event_type] = counts.get(event_type, 0) + n
            return {
                "stream": store.stream,
                "first_seq": first_seq,
                "last_seq": last_seq,
                "total": sum(counts.values()),
                "by_type": dict(sorted(counts.items())),
            }

    stats = asyncio.run(go())
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    table = Table(title=f"{stats['stream']}: seq {stats['first_seq']}..{stats['last_seq']}")
    table.add_column("event type")
    table.add_column("count", justify="right")
    for name, n in stats["by_type"].items():
        table.add_row(name, str(n))
    table.add_row("[b]total[/b]", f"[b]{stats['total']}[/b]")
    Console().print(table)
    return 0
