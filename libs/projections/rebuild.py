"""Rebuilding a service's read models from the log in a scratch schema, and swapping them in.

The scratch schema ``<schema>__replay`` is built by the same migrations and fed the same events
through the same projection code as the live one, by a reader that moves no consumer. Events an
operator told the live projection to skip are skipped here too. ``swap_in`` replaces the live
rows with the rebuilt ones in one transaction that holds the live checkpoints, so a running
service waits for a moment and then carries on from where the rebuild ended.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import asyncpg

from libs.db.postgres import check_schema_name, drop_schema, migrate, service_migrations
from libs.eventlog.errors import EventStoreError
from libs.eventlog.reader import ReadPosition, StoredMessage
from libs.eventlog.store import EventStore
from libs.projections.apply import PoisonEvent, Projection, apply_stored
from libs.projections.checkpoints import ensure_checkpoint
from libs.projections.reports import ReplayError, ReplayReport

Progress = Callable[[int, int], None]

# Events applied per transaction when rebuilding.
REPLAY_CHUNK = 500


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
