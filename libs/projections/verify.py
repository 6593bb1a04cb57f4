"""Checking the live read models against the log: how far behind each is, and which rows differ.

``verify`` first measures each live projection against the head of the log (the stream's last
sequence when the check starts), waiting a bounded time for it to get there, then compares the
scratch tables of a rebuild (``libs/projections/rebuild.py``) with the live ones at the same
checkpoint, and reports every row that differs and every projection still behind the head, by
how many of its events.
"""

from __future__ import annotations

import asyncio
import json
import time
from array import array
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

import asyncpg

from libs.db.postgres import check_schema_name
from libs.eventlog.errors import EventStoreError
from libs.eventlog.reader import ReadPosition
from libs.projections.rebuild import Rebuild
from libs.projections.reports import ProjectionCheck, ReplayError, ReplayReport, TableDiff

# How long ``verify`` waits, by default, for the live projections to reach the head of the log.
VERIFY_WAIT_SECONDS = 5.0
# How often it looks at their checkpoints meanwhile.
_HEAD_POLL_SECONDS = 0.1


@dataclass
class OwedEvents:
    """The events of each projection's types after its checkpoint, up to the head of the log.

    Kept as sorted sequences (8 bytes each), so the lag at any later checkpoint is a bisection;
    a projection that never ran owes the whole log, which this holds in 8 bytes an event.
    """

    head: int
    after: dict[str, int]
    seqs: dict[str, array[int]]

    def lag(self, projection: str, checkpoint: int) -> int:
        """How many of ``projection``'s events up to the head lie after ``checkpoint``."""
        if checkpoint < self.after[projection]:
            # Only a stream created again or a restored database moves a checkpoint back.
            raise ReplayError(
                f"{projection}: the live checkpoint went back from {self.after[projection]} to "
                f"{checkpoint} while it was verified; run verify again"
            )
        owed = self.seqs[projection]
        return len(owed) - bisect_right(owed, checkpoint)


async def owed_events(rebuild: Rebuild, head: int, checkpoints: dict[str, int]) -> OwedEvents:
    """Read the log after the lowest checkpoint, through ``head``, noting for each
    projection the events of its types it has not applied yet (a read, no consumer moved)."""
    owed = OwedEvents(
        head,
        dict(checkpoints),
        {p.name: array("q") for p in rebuild.projections},
    )
    start = min(checkpoints.values(), default=head) + 1
    if start > head:
        return owed
    by_type: dict[str, list[str]] = {}
    for projection in rebuild.projections:
        for event_type in projection.event_types:
            by_type.setdefault(event_type, []).append(projection.name)
    position = ReadPosition()
    try:
        async for stored in rebuild.store.read(
            from_seq=start, to_seq=head, event_types=list(by_type), position=position
        ):
            for name in by_type.get(stored.event_type, ()):
                if stored.seq > checkpoints[name]:
                    owed.seqs[name].append(stored.seq)
    except EventStoreError as exc:
        raise ReplayError(f"reading the log failed: {exc}") from exc
    if position.through < head:
        raise ReplayError(f"the log reader stopped at seq {position.through}, before {head}")
    return owed


async def wait_for_head(rebuild: Rebuild, owed: OwedEvents, seconds: float) -> dict[str, int]:
    """The live checkpoints once every projection has applied its events up to the head,
    or as they are when ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    while True:
        checkpoints = await rebuild.live_checkpoints()
        behind = [n for n, seq in checkpoints.items() if owed.lag(n, seq) > 0]
        if not behind or time.monotonic() >= deadline:
            return checkpoints
        await asyncio.sleep(_HEAD_POLL_SECONDS)


async def first_parked(rebuild: Rebuild) -> dict[str, int]:
    """The first open parked event of each live projection that has one."""
    rows = await rebuild.conn.fetch(
        f"SELECT projection, min(seq) AS seq FROM {rebuild.schema}.parked_events "
        "WHERE resolved_at IS NULL GROUP BY projection"
    )
    return {r["projection"]: int(r["seq"]) for r in rows}


async def compare_tables(rebuild: Rebuild) -> list[TableDiff]:
    """Every row that differs between the live and the scratch tables, by primary key."""
    diffs: list[TableDiff] = []
    for projection in rebuild.projections:
        for table in projection.tables:
            diffs.append(await _compare_table(rebuild, table, projection.name))
    return diffs


async def _compare_table(rebuild: Rebuild, table: str, projection: str) -> TableDiff:
    keys = await primary_key(rebuild.conn, rebuild.schema, table)
    live = await _rows(rebuild, rebuild.schema, table)
    rebuilt = await _rows(rebuild, rebuild.scratch, table)

    def key_of(row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(row.get(k) for k in keys) if keys else tuple(sorted(row.items()))

    live_by_key = {key_of(r): r for r in live}
    rebuilt_by_key = {key_of(r): r for r in rebuilt}
    diff = TableDiff(table=table, projection=projection)
    for key, row in live_by_key.items():
        other = rebuilt_by_key.get(key)
        if other is None:
            diff.only_live.append(row)
        elif other != row:
            diff.changed.append((row, other))
    diff.only_rebuilt = [r for k, r in rebuilt_by_key.items() if k not in live_by_key]
    return diff


async def _rows(rebuild: Rebuild, schema: str, table: str) -> list[dict[str, Any]]:
    rows = await rebuild.conn.fetch(
        f"SELECT to_jsonb(t)::text AS row FROM {check_schema_name(schema)}.{table} t"
    )
    return [json.loads(r["row"]) for r in rows]


async def primary_key(conn: asyncpg.Connection, schema: str, table: str) -> list[str]:
    """The primary-key columns of a table, in order."""
    rows = await conn.fetch(
        """
        SELECT a.attname
        FROM pg_index i
        JOIN pg_class c ON c.oid = i.indrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = ANY(i.indkey)
        WHERE i.indisprimary AND n.nspname = $1 AND c.relname = $2
        ORDER BY array_position(i.indkey, a.attnum)
        """,
        schema,
        table,
    )
    return [r["attname"] for r in rows]


async def verify_live(rebuild: Rebuild, report: ReplayReport, wait: float) -> None:
    """Measure every projection against the head of the log, then compare rows.

    The head is taken first; each projection gets up to ``wait`` seconds to apply its events
    up to it. Rows are then compared at one checkpoint per projection, the same on both sides:
    a live projection past the head (the log is busy) is met by the rebuild where it is, so new
    events are no false difference; one still behind is compared where it stopped, and its lag
    is reported on its own, so a stalled projection can never pass for a verified one.
    """
    report.head = await rebuild.store.last_seq()
    started = await rebuild.live_checkpoints()
    owed = await owed_events(rebuild, report.head, started)
    await wait_for_head(rebuild, owed, wait)
    compared = await _compare_at_live_checkpoints(rebuild, report)
    differences: dict[str, int] = {}
    for diff in report.diffs:
        rows = len(diff.only_live) + len(diff.only_rebuilt) + len(diff.changed)
        differences[diff.projection] = differences.get(diff.projection, 0) + rows
    parked = await first_parked(rebuild)
    report.checks = [
        ProjectionCheck(
            projection=name,
            checkpoint=seq,
            head=report.head,
            lag=owed.lag(name, seq),
            moved=seq > started[name],
            differences=differences.get(name, 0),
            parked_at=parked.get(name),
        )
        for name, seq in compared.items()
    ]


async def _compare_at_live_checkpoints(
    rebuild: Rebuild, report: ReplayReport, attempts: int = 3
) -> dict[str, int]:
    """Compare at one checkpoint per projection, the same on both sides; the checkpoints used.

    First without disturbing the service: catch up, then compare in a snapshot if the live
    checkpoints have not moved meanwhile. On a log too busy for that, hold the live checkpoints
    (a running projection waits for that moment, as during a swap) and compare under the hold.
    """
    for _ in range(attempts):
        targets = await rebuild.live_checkpoints()
        await rebuild.catch_up(targets, report)
        async with rebuild.conn.transaction(isolation="repeatable_read", readonly=True):
            if await rebuild.live_checkpoints() != targets:
                continue
            report.diffs = await compare_tables(rebuild)
            return targets
    async with rebuild.conn.transaction():
        # Every apply locks its checkpoint row first, so no live row changes while these are held.
        await rebuild.hold_live_checkpoints("SHARE")
        targets = await rebuild.live_checkpoints()
        await rebuild.catch_up(targets, report)
        report.diffs = await compare_tables(rebuild)
    return targets
