"""Rebuilding a service's read models from the log, and checking the live ones against it.

A rebuild always happens in a scratch schema first, built by the same migrations and the same
projection code as the live one, and fed from the log by a reader that moves no consumer. Then:

- ``verify`` first measures each live projection against the head of the log (the stream's last
  sequence when the check starts), waiting a bounded time for it to get there, then compares the
  scratch tables with the live ones at the same checkpoint and reports every row that differs
  and every projection still behind the head, by how many of its events;
- a real replay swaps the rebuilt rows in, in one transaction that holds the live checkpoints,
  so a running service waits for a moment and then carries on from where the rebuild ended.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from array import array
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg

from libs.db.postgres import check_schema_name, drop_schema, migrate, service_migrations
from libs.eventlog.store import EventStore, EventStoreError, ReadPosition, StoredMessage
from libs.projections.core import PoisonEvent, Projection, apply_stored, ensure_checkpoint

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

# Events applied per transaction when rebuilding.
REPLAY_CHUNK = 500

# How long ``verify`` waits, by default, for the live projections to reach the head of the log.
VERIFY_WAIT_SECONDS = 5.0
# How often it looks at their checkpoints meanwhile.
_HEAD_POLL_SECONDS = 0.1


class ReplayError(RuntimeError):
    """The rebuild could not be done as asked: an event it could not apply that the live
    projection did not skip, a log it could not read to the end, or a partial rebuild that
    would replace the live read models."""


@dataclass
class TableDiff:
    """Rows of one table that differ between the live and the rebuilt read model."""

    table: str
    projection: str = ""
    only_live: list[dict[str, Any]] = field(default_factory=list)
    only_rebuilt: list[dict[str, Any]] = field(default_factory=list)
    changed: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True when the table is the same in both."""
        return not (self.only_live or self.only_rebuilt or self.changed)


@dataclass
class ProjectionCheck:
    """Where one live projection stood against the head of the log when it was verified.

    ``lag`` counts the events of the projection's own types after its checkpoint, up to the
    head: a projection whose last event is older than the head is at the head with lag 0.
    ``moved`` says whether its checkpoint advanced while verify waited for it: a projection
    behind the head that did not move is stalled (its runner dead or blocked), not just slow.
    """

    projection: str
    checkpoint: int
    head: int
    lag: int
    moved: bool
    differences: int = 0
    parked_at: int | None = None

    @property
    def state(self) -> str:
        """``at head``; else ``blocked`` (at a parked event, for the operator to decide),
        ``behind`` (it moved while verify waited) or ``stalled``."""
        if self.lag == 0:
            return "at head"
        if self.parked_at is not None:
            return "blocked"
        return "behind" if self.moved else "stalled"


@dataclass
class ReplayReport:
    """What a rebuild did: events read and applied, up to which sequence, and any differences.

    A verify also records the head of the log it measured against and, per projection, its
    checkpoint and lag (``checks``).
    """

    service: str
    events_read: int = 0
    events_applied: int = 0
    upto_seq: int = 0
    diffs: list[TableDiff] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    head: int = 0
    checks: list[ProjectionCheck] = field(default_factory=list)

    @property
    def differences(self) -> int:
        """Number of differing rows across all tables."""
        return sum(len(d.only_live) + len(d.only_rebuilt) + len(d.changed) for d in self.diffs)

    def lagging(self, max_lag: int = 0) -> list[ProjectionCheck]:
        """The projections more than ``max_lag`` of their events behind the head."""
        return [c for c in self.checks if c.lag > max_lag]


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


@dataclass
class Rebuild:
    """One rebuild of one service's projections into ``<schema>__replay``."""

    conn: asyncpg.Connection
    store: EventStore
    schema: str
    migrations_package: str
    projections: Sequence[Projection]
    from_seq: int = 1
    progress: Progress | None = None

    @property
    def scratch(self) -> str:
        """The scratch schema the rebuild writes to."""
        return check_schema_name(f"{self.schema}__replay")

    async def prepare(self) -> None:
        """A fresh scratch schema with the service's tables, every checkpoint at from_seq - 1."""
        await drop_schema(self.conn, self.scratch)
        await migrate(self.conn, self.scratch, service_migrations(self.migrations_package))
        await self._use(self.scratch)
        for projection in self.projections:
            await ensure_checkpoint(self.conn, projection.name)
        if self.from_seq > 1:
            await self.conn.execute(
                "UPDATE projection_checkpoints SET last_seq = $1", self.from_seq - 1
            )

    async def hold_live_checkpoints(self, mode: Literal["UPDATE", "SHARE"]) -> None:
        """Lock the live checkpoint rows of these projections until the transaction ends
        (every apply locks its row first): ``SHARE`` holds them still, ``UPDATE`` for a swap."""
        await self.conn.execute(
            f"SELECT 1 FROM {self.schema}.projection_checkpoints "
            f"WHERE projection = ANY($1::text[]) FOR {mode}",
            [p.name for p in self.projections],
        )

    async def live_checkpoints(self) -> dict[str, int]:
        """Checkpoints of the live projections (0 for one that never ran, or that read a
        stream of the same name that has since been created again)."""
        created, _ = await self.store.identity()
        rows = await self.conn.fetch(
            f"SELECT projection, last_seq, stream_created FROM {self.schema}.projection_checkpoints"
        )
        found = {
            r["projection"]: int(r["last_seq"])
            for r in rows
            if r["stream_created"] is None or created is None or r["stream_created"] == created
        }
        return {p.name: found.get(p.name, 0) for p in self.projections}

    async def skipped_live(self) -> set[tuple[str, int]]:
        """Events an operator told the live projections to skip: the rebuild skips them too."""
        rows = await self.conn.fetch(
            f"SELECT projection, seq FROM {self.schema}.parked_events "
            "WHERE decision = 'skip' AND resolved_at IS NOT NULL"
        )
        return {(r["projection"], int(r["seq"])) for r in rows}

    async def catch_up(self, targets: dict[str, int], report: ReplayReport) -> None:
        """Apply events to the scratch projections until each reaches its target sequence."""
        await self._use(self.scratch)
        start = min([await self._scratch_checkpoint(p.name) for p in self.projections] or [0]) + 1
        end = max(targets.values(), default=0)
        if end < start:
            return
        skips = await self.skipped_live()
        types = {t for p in self.projections for t in p.event_types}
        position = ReadPosition()
        try:
            await self._apply_range(start, end, types, targets, skips, report, position)
        except EventStoreError as exc:
            raise ReplayError(f"reading the log failed: {exc}") from exc
        if position.through < end:
            # Moving the checkpoints to the targets now would claim events never applied.
            raise ReplayError(f"the log reader stopped at seq {position.through}, before {end}")
        for projection in self.projections:
            await self._skip(projection.name, targets[projection.name])
        report.upto_seq = max(report.upto_seq, end)

    async def owed(self, head: int, checkpoints: dict[str, int]) -> OwedEvents:
        """Read the log after the lowest checkpoint, through ``head``, noting for each
        projection the events of its types it has not applied yet (a read, no consumer moved)."""
        owed = OwedEvents(
            head,
            dict(checkpoints),
            {p.name: array("q") for p in self.projections},
        )
        start = min(checkpoints.values(), default=head) + 1
        if start > head:
            return owed
        by_type: dict[str, list[str]] = {}
        for projection in self.projections:
            for event_type in projection.event_types:
                by_type.setdefault(event_type, []).append(projection.name)
        position = ReadPosition()
        try:
            async for stored in self.store.read(
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

    async def wait_for_head(self, owed: OwedEvents, seconds: float) -> dict[str, int]:
        """The live checkpoints once every projection has applied its events up to the head,
        or as they are when ``seconds`` have passed."""
        deadline = time.monotonic() + seconds
        while True:
            checkpoints = await self.live_checkpoints()
            behind = [n for n, seq in checkpoints.items() if owed.lag(n, seq) > 0]
            if not behind or time.monotonic() >= deadline:
                return checkpoints
            await asyncio.sleep(_HEAD_POLL_SECONDS)

    async def first_parked(self) -> dict[str, int]:
        """The first open parked event of each live projection that has one."""
        rows = await self.conn.fetch(
            f"SELECT projection, min(seq) AS seq FROM {self.schema}.parked_events "
            "WHERE resolved_at IS NULL GROUP BY projection"
        )
        return {r["projection"]: int(r["seq"]) for r in rows}

    async def _apply_range(
        self,
        start: int,
        end: int,
        types: set[str],
        targets: dict[str, int],
        skips: set[tuple[str, int]],
        report: ReplayReport,
        position: ReadPosition,
    ) -> None:
        chunk: list[StoredMessage] = []
        read = self.store.read(from_seq=start, to_seq=end, event_types=types, position=position)
        async for stored in read:
            chunk.append(stored)
            if len(chunk) >= REPLAY_CHUNK:
                await self._apply_chunk(chunk, targets, skips, report, end)
                chunk = []
        await self._apply_chunk(chunk, targets, skips, report, end)

    async def _apply_chunk(
        self,
        chunk: list[StoredMessage],
        targets: dict[str, int],
        skips: set[tuple[str, int]],
        report: ReplayReport,
        end: int,
    ) -> None:
        """Apply a chunk of events in one transaction: one commit instead of one per event."""
        async with self.conn.transaction():
            for stored in chunk:
                report.events_read += 1
                for projection in self.projections:
                    if stored.seq > targets[projection.name]:
                        continue
                    if stored.event_type not in projection.event_types:
                        continue  # its live consumer's filter never delivers this type
                    if (projection.name, stored.seq) in skips:
                        await self._skip(projection.name, stored.seq)
                        report.skipped.append(stored.seq)
                        continue
                    try:
                        await apply_stored(self.conn, projection, stored)
                    except PoisonEvent as exc:
                        raise ReplayError(
                            f"{projection.name}: event at seq {stored.seq} cannot be applied "
                            f"({exc.reason}) and the live projection has not skipped it"
                        ) from exc
                    report.events_applied += 1
                report.upto_seq = stored.seq
                if self.progress is not None:
                    self.progress(stored.seq, end)

    async def _skip(self, projection: str, seq: int) -> None:
        await self.conn.execute(
            "UPDATE projection_checkpoints SET last_seq = GREATEST(last_seq, $2) "
            "WHERE projection = $1",
            projection,
            seq,
        )

    async def _scratch_checkpoint(self, projection: str) -> int:
        value = await self.conn.fetchval(
            "SELECT last_seq FROM projection_checkpoints WHERE projection = $1", projection
        )
        return int(value or 0)

    async def _use(self, schema: str) -> None:
        await self.conn.execute(f"SET search_path TO {check_schema_name(schema)}, public")

    async def compare(self) -> list[TableDiff]:
        """Every row that differs between the live and the scratch tables, by primary key."""
        diffs: list[TableDiff] = []
        for projection in self.projections:
            for table in projection.tables:
                diffs.append(await self._compare_table(table, projection.name))
        return diffs

    async def _compare_table(self, table: str, projection: str) -> TableDiff:
        keys = await primary_key(self.conn, self.schema, table)
        live = await self._rows(self.schema, table)
        rebuilt = await self._rows(self.scratch, table)

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

    async def _rows(self, schema: str, table: str) -> list[dict[str, Any]]:
        rows = await self.conn.fetch(
            f"SELECT to_jsonb(t)::text AS row FROM {check_schema_name(schema)}.{table} t"
        )
        return [json.loads(r["row"]) for r in rows]

    async def swap_in(self, report: ReplayReport) -> None:
        """Replace the live rows with the rebuilt ones, holding the live checkpoints meanwhile.

        Events the live projection applied while the rebuild ran are applied to the scratch
        tables first, inside the same transaction, so no event is lost or applied twice.
        """
        refuse_partial_swap(self.from_seq)
        async with self.conn.transaction():
            await self.hold_live_checkpoints("UPDATE")
            # The live service may have gone past the rebuild meanwhile: reach it first.
            live = await self.live_checkpoints()
            targets = {name: max(seq, report.upto_seq) for name, seq in live.items()}
            await self.catch_up(targets, report)
            tables = [t for p in self.projections for t in p.tables]
            live_tables = ", ".join(f"{self.schema}.{t}" for t in tables)
            await self.conn.execute(f"TRUNCATE {live_tables}")
            for table in tables:
                await self.conn.execute(
                    f"INSERT INTO {self.schema}.{table} SELECT * FROM {self.scratch}.{table}"
                )
            # The rebuilt models come from the stream as it is now: the live projections read
            # on from it (after a stream was created again, this is how they start anew).
            created, _ = await self.store.identity()
            await self.conn.execute(
                f"INSERT INTO {self.schema}.projection_checkpoints "
                "(projection, last_seq, stream_created) "
                f"SELECT projection, last_seq, $1 FROM {self.scratch}.projection_checkpoints "
                "ON CONFLICT (projection) DO UPDATE "
                "SET last_seq = EXCLUDED.last_seq, stream_created = EXCLUDED.stream_created, "
                "updated_at = now()",
                created,
            )
        await self._use(self.schema)

    async def cleanup(self) -> None:
        """Drop the scratch schema."""
        await drop_schema(self.conn, self.scratch)


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


async def replay_service(
    conn: asyncpg.Connection,
    store: EventStore,
    *,
    schema: str,
    migrations_package: str,
    projections: Sequence[Projection],
    from_seq: int = 1,
    dry_run: bool = False,
    verify: bool = False,
    wait: float = VERIFY_WAIT_SECONDS,
    progress: Progress | None = None,
) -> ReplayReport:
    """Rebuild a service's read models from the log (see the module's docstring).

    ``dry_run`` rebuilds and reports without touching the live tables. ``verify`` takes the
    head of the log, waits up to ``wait`` seconds for the live projections to reach it, and
    reports each one's checkpoint and lag (``ReplayReport.checks``) and every row that differs
    from a rebuild to the same checkpoint. A ``from_seq`` after 1 is for those two only:
    ``ReplayError`` otherwise, before anything is touched.
    """
    if not (dry_run or verify):
        refuse_partial_swap(from_seq)
    report = ReplayReport(service=schema)
    rebuild = Rebuild(conn, store, schema, migrations_package, projections, from_seq, progress)
    # The live schema must exist (migrated) for checkpoints and the swap; a service that never
    # ran gets its tables here.
    await migrate(conn, schema, service_migrations(migrations_package))
    await rebuild.prepare()
    try:
        if verify:
            await _verify(rebuild, report, wait)
        else:
            end = await store.last_seq()
            await rebuild.catch_up({p.name: end for p in projections}, report)
            if not dry_run:
                await rebuild.swap_in(report)
    finally:
        await rebuild.cleanup()
    return report


def refuse_partial_swap(from_seq: int) -> None:
    """Raise ``ReplayError`` for a rebuild from after seq 1 that would replace the live rows.

    Rebuilt from an empty model, it lacks every row the events before ``from_seq`` built, and
    the swap truncates the live tables: those rows would be lost.
    """
    if from_seq > 1:
        raise ReplayError(
            f"a rebuild from seq {from_seq} lacks the events before it, so it cannot replace "
            "the live read models; rebuild from seq 1, or start later only for a dry run or verify"
        )


async def _verify(rebuild: Rebuild, report: ReplayReport, wait: float) -> None:
    """Measure every projection against the head of the log, then compare rows.

    The head is taken first; each projection gets up to ``wait`` seconds to apply its events
    up to it. Rows are then compared at one checkpoint per projection, the same on both sides:
    a live projection past the head (the log is busy) is met by the rebuild where it is, so new
    events are no false difference; one still behind is compared where it stopped, and its lag
    is reported on its own, so a stalled projection can never pass for a verified one.
    """
    report.head = await rebuild.store.last_seq()
    started = await rebuild.live_checkpoints()
    owed = await rebuild.owed(report.head, started)
    await rebuild.wait_for_head(owed, wait)
    compared = await _compare_at_live_checkpoints(rebuild, report)
    differences: dict[str, int] = {}
    for diff in report.diffs:
        rows = len(diff.only_live) + len(diff.only_rebuilt) + len(diff.changed)
        differences[diff.projection] = differences.get(diff.projection, 0) + rows
    parked = await rebuild.first_parked()
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
            report.diffs = await rebuild.compare()
            return targets
    async with rebuild.conn.transaction():
        # Every apply locks its checkpoint row first, so no live row changes while these are held.
        await rebuild.hold_live_checkpoints("SHARE")
        targets = await rebuild.live_checkpoints()
        await rebuild.catch_up(targets, report)
        report.diffs = await rebuild.compare()
    return targets
