"""``iotistic replay <service>``: rebuild, dry-run or verify a service's read models from the
log, and report what a verify found, as text or JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from libs.config import ServiceSettings
from libs.projections.replay import replay_service
from libs.projections.reports import ProjectionCheck, ReplayError, ReplayReport, TableDiff
from libs.projections.verify import VERIFY_WAIT_SECONDS
from libs.sealing.vault import master_key
from services.cli.arguments import count
from services.cli.environment import console, settings_from
from services.cli.event_log import connected
from services.targets import CONTROL_PLANE


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``replay``'s arguments."""
    replay = subparsers.add_parser("replay", help="rebuild a service's read models from the log")
    replay.add_argument(
        "service", choices=sorted(CONTROL_PLANE), help="the service whose read models to rebuild"
    )
    replay.add_argument(
        "--from-seq",
        type=int,
        default=1,
        help="first stream sequence to read (with --dry-run or --verify only)",
    )
    replay.add_argument("--dry-run", action="store_true", help="rebuild and report, change nothing")
    replay.add_argument(
        "--verify",
        action="store_true",
        help="measure each projection against the head of the log and compare its rows with "
        "a rebuild into a scratch schema; exit 1 on a difference or a projection behind",
    )
    replay.add_argument(
        "--max-lag",
        type=count,
        help="with --verify: events a projection may be behind the head (default 0: at the head)",
    )
    replay.add_argument(
        "--wait",
        type=float,
        help="with --verify: seconds to wait for the projections to reach the head "
        f"(default {VERIFY_WAIT_SECONDS:g})",
    )
    replay.add_argument("--json", action="store_true", help="the report as JSON")
    replay.set_defaults(func=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    """``iotistic replay <service>``: rebuild, dry-run or verify a service's read models."""
    if not args.verify and (args.max_lag is not None or args.wait is not None):
        console.print("[red]replay:[/red] --max-lag and --wait go with --verify only")
        return 2
    settings = settings_from(args)
    try:
        report = asyncio.run(_replay(args, settings))
    except ReplayError as exc:
        console.print(f"[red]replay failed:[/red] {exc}")
        return 1
    max_lag = args.max_lag or 0
    failed = args.verify and bool(report.differences or report.lagging(max_lag))
    if args.json:
        print(json.dumps(_replay_json(report, args, max_lag, failed), indent=2, default=str))
    else:
        _print_replay(report, args, max_lag)
    return 1 if failed else 0


async def _replay(args: argparse.Namespace, settings: ServiceSettings) -> ReplayReport:
    """The replay itself, with a progress bar on standard error."""
    definition = CONTROL_PLANE[args.service]
    if settings.data_keys_master_key:
        master_key(settings.data_keys_master_key)  # the views open sealed personal data
    async with connected(settings) as (store, conn):
        with Progress(
            TextColumn(f"replay {args.service}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("events", total=None)

            def progress(seq: int, end: int) -> None:
                bar.update(task, completed=seq, total=end)

            return await replay_service(
                conn,
                store,
                schema=definition.schema,
                migrations_package=definition.migrations_package,
                projections=definition.projections,
                from_seq=args.from_seq,
                dry_run=args.dry_run,
                verify=args.verify,
                wait=VERIFY_WAIT_SECONDS if args.wait is None else args.wait,
                progress=progress,
            )


def _replay_mode(args: argparse.Namespace) -> str:
    return "verify" if args.verify else "dry run" if args.dry_run else "rebuild"


def _print_replay(report: ReplayReport, args: argparse.Namespace, max_lag: int) -> None:
    out = Console()
    out.print(
        f"{report.service} {_replay_mode(args)}: read {report.events_read} events, applied "
        f"{report.events_applied}, up to seq {report.upto_seq}"
        + (f", skipped as the live projection did: {report.skipped}" if report.skipped else "")
    )
    if not args.verify:
        if not args.dry_run:
            out.print("live read models replaced by the rebuilt ones")
        return
    out.print(f"head of the log: seq {report.head}")
    for check in report.checks:
        colour = "green" if check.lag == 0 else "red" if check.lag > max_lag else "yellow"
        out.print(
            f"  {check.projection}: checkpoint {check.checkpoint}, head {check.head}, "
            f"[{colour}]lag {check.lag} ({check.state})[/{colour}], "
            f"differences {check.differences}"
        )
    lagging = report.lagging(max_lag)
    for check in lagging:
        out.print(_lagging_line(check, max_lag))
    if report.differences == 0:
        if lagging:
            out.print(
                "no row differences at the checkpoints compared; the events after them are "
                "not in the live read models yet"
            )
        else:
            out.print("no differences: the live read models equal a clean replay of the log")
        return
    _print_differences(out, report)


def _lagging_line(check: ProjectionCheck, max_lag: int) -> str:
    return (
        f"[red]{check.projection} is {check.lag} event(s) behind the head "
        f"(checkpoint {check.checkpoint}, head {check.head}, allowed {max_lag})"
        + (
            f": blocked at parked event seq {check.parked_at} (`iotistic parked list`)"
            if check.parked_at is not None
            else ": it did not move while verify waited"
            if not check.moved
            else ""
        )
        + "[/red]"
    )


def _print_differences(out: Console, report: ReplayReport) -> None:
    out.print(f"[red]{report.differences} difference(s):[/red]")
    for diff in report.diffs:
        for row in diff.only_live:
            out.print(f"  {diff.table}: only in live: {json.dumps(row, default=str)}")
        for row in diff.only_rebuilt:
            out.print(f"  {diff.table}: missing from live: {json.dumps(row, default=str)}")
        for live, rebuilt in diff.changed:
            columns = sorted(k for k in live if live.get(k) != rebuilt.get(k))
            changes = ", ".join(
                f"{c}: live={live.get(c)!r} replay={rebuilt.get(c)!r}" for c in columns
            )
            out.print(f"  {diff.table}: row differs: {changes}")


def _replay_json(
    report: ReplayReport, args: argparse.Namespace, max_lag: int, failed: bool
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "service": report.service,
        "mode": _replay_mode(args),
        "ok": not failed,
        "events_read": report.events_read,
        "events_applied": report.events_applied,
        "upto_seq": report.upto_seq,
        "skipped": report.skipped,
    }
    if args.verify:
        data["head"] = report.head
        data["max_lag"] = max_lag
        data["projections"] = [_check_json(c, report.diffs) for c in report.checks]
    return data


def _check_json(check: ProjectionCheck, diffs: list[TableDiff]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for diff in diffs:
        if diff.projection != check.projection:
            continue
        rows += [{"table": diff.table, "only_live": row} for row in diff.only_live]
        rows += [{"table": diff.table, "missing_from_live": row} for row in diff.only_rebuilt]
        rows += [{"table": diff.table, "live": a, "replay": b} for a, b in diff.changed]
    return {
        "projection": check.projection,
        "checkpoint": check.checkpoint,
        "head": check.head,
        "lag": check.lag,
        "state": check.state,
        "parked_at": check.parked_at,
        "differences": check.differences,
        "rows": rows,
    }
