"""A projection's checkpoint row: where it is in the log, which log, and which replica leads.

``projection_checkpoints`` holds, per projection, the last stream sequence applied (moved in
the transaction that applied the events), when the stream it read was created (so a stream
made again is not taken for the one already read) and an epoch counted up by each replica that
takes the projection over (so one that lost the lead without noticing cannot write).
"""

from __future__ import annotations

from datetime import datetime

import asyncpg


async def ensure_checkpoint(conn: asyncpg.Connection, projection: str) -> int:
    """The projection's checkpoint, creating it at 0 the first time."""
    await conn.execute(
        "INSERT INTO projection_checkpoints (projection) VALUES ($1) ON CONFLICT DO NOTHING",
        projection,
    )
    value = await conn.fetchval(
        "SELECT last_seq FROM projection_checkpoints WHERE projection = $1", projection
    )
    return int(value)


class LogMismatch(Exception):
    """The log is not the one the projection has read: it was created again, or it ends before
    the checkpoint. Consuming would take its events for ones already applied."""


async def check_stream(
    conn: asyncpg.Connection,
    projection: str,
    checkpoint: int,
    created: datetime | None,
    last_seq: int,
) -> None:
    """Raise ``LogMismatch`` unless the stream is the one this projection has read so far; a
    projection that has read nothing (or predates the record) adopts the current stream."""
    seen = await conn.fetchval(
        "SELECT stream_created FROM projection_checkpoints WHERE projection = $1", projection
    )
    if created is not None and (seen is None or checkpoint == 0):
        await conn.execute(
            "UPDATE projection_checkpoints SET stream_created = $2 WHERE projection = $1",
            projection,
            created,
        )
    elif created is not None and seen != created:
        raise LogMismatch(
            f"the event stream was created again ({created.isoformat()}; this projection read "
            f"the one created {seen.isoformat()}, up to seq {checkpoint}): restore the stream, "
            "or rebuild the read models from the new one with `iotistic replay`"
        )
    if checkpoint > last_seq:
        raise LogMismatch(
            f"the event stream ends at seq {last_seq} but this projection has applied events "
            f"up to seq {checkpoint}: events were lost from the log; restore it, or rebuild the "
            "read models with `iotistic replay`"
        )


class LostLeadership(Exception):
    """Another replica has taken the projection since this one did: it must not write."""


async def lock_checkpoint(
    conn: asyncpg.Connection, projection: str, epoch: int | None = None
) -> int:
    """The checkpoint, locked until the transaction ends (one applier at a time). With
    ``epoch``, raise ``LostLeadership`` unless it is still the projection's."""
    row = await conn.fetchrow(
        "SELECT last_seq, epoch FROM projection_checkpoints WHERE projection = $1 FOR UPDATE",
        projection,
    )
    if row is None:
        raise RuntimeError(f"projection {projection} has no checkpoint row")
    if epoch is not None and row["epoch"] != epoch:
        raise LostLeadership(
            f"projection {projection} was taken by another replica (epoch {row['epoch']}, "
            f"this one had {epoch})"
        )
    return int(row["last_seq"])


async def take_leadership(conn: asyncpg.Connection, projection: str) -> int:
    """Count the projection's epoch up for a replica that now holds its lock; the new epoch."""
    return int(
        await conn.fetchval(
            "UPDATE projection_checkpoints SET epoch = epoch + 1 WHERE projection = $1 "
            "RETURNING epoch",
            projection,
        )
    )


async def save_checkpoint(conn: asyncpg.Connection, projection: str, seq: int) -> None:
    """Move the checkpoint, in the transaction that applied the events up to ``seq``."""
    await conn.execute(
        "UPDATE projection_checkpoints SET last_seq = $2, updated_at = now() WHERE projection = $1",
        projection,
        seq,
    )
