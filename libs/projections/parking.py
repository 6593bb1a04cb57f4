"""Parked events: what a projection could not apply, and the operator's decision on each.

The runner parks an event it cannot apply (``park``) and waits at it; an operator lists what is
parked (``open_parked``, `iotistic parked`) and decides to ``skip`` it or ``retry`` it
(``decide``); the runner carries the decision out (``resolve_decision``) and moves on.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from libs.eventlog.reader import StoredMessage


async def park(
    conn: asyncpg.Connection, projection: str, stored: StoredMessage, reason: str, attempts: int
) -> None:
    """Record ``stored`` as parked for ``projection``, with why and after how many attempts.

    Parked again (a retry that failed), it counts the attempts up; a decision taken while no
    runner was waiting for it still stands.
    """
    await conn.execute(
        """
        INSERT INTO parked_events
            (projection, seq, subject, event_type, event_id, payload, error, attempts)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        ON CONFLICT (projection, seq) DO UPDATE SET
            error = EXCLUDED.error,
            attempts = parked_events.attempts + EXCLUDED.attempts,
            parked_at = now(),
            -- a decision taken while no runner was waiting still stands
            decision = CASE WHEN parked_events.resolved_at IS NULL
                            THEN parked_events.decision END,
            decided_at = CASE WHEN parked_events.resolved_at IS NULL
                              THEN parked_events.decided_at END,
            resolved_at = NULL
        """,
        projection,
        stored.seq,
        stored.subject,
        stored.event_type,
        stored.headers.get("Nats-Msg-Id"),
        stored.data,
        reason,
        attempts,
    )


async def resolve_decision(conn: asyncpg.Connection, projection: str, seq: int) -> str | None:
    """Carry out an operator's decision on a parked event, if one was made.

    ``skip`` advances the checkpoint past the event; ``retry`` leaves it, so the event is
    applied again. Either way the parked row is marked resolved. Returns the decision.
    """
    async with conn.transaction():
        decision = await conn.fetchval(
            "SELECT decision FROM parked_events WHERE projection = $1 AND seq = $2 "
            "AND resolved_at IS NULL FOR UPDATE",
            projection,
            seq,
        )
        if decision is None:
            return None
        if decision == "skip":
            await conn.execute(
                "UPDATE projection_checkpoints SET last_seq = GREATEST(last_seq, $2), "
                "updated_at = now() WHERE projection = $1",
                projection,
                seq,
            )
        await conn.execute(
            "UPDATE parked_events SET resolved_at = now() WHERE projection = $1 AND seq = $2",
            projection,
            seq,
        )
        return str(decision)


async def decide(conn: asyncpg.Connection, projection: str, seq: int, decision: str) -> bool:
    """Record an operator's ``skip`` or ``retry`` for an open parked event; False if none."""
    if decision not in ("skip", "retry"):
        raise ValueError("decision must be skip or retry")
    result = await conn.execute(
        "UPDATE parked_events SET decision = $3, decided_at = now() "
        "WHERE projection = $1 AND seq = $2 AND resolved_at IS NULL",
        projection,
        seq,
        decision,
    )
    return bool(result.endswith(" 1"))


async def open_parked(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """Parked events not yet resolved, oldest first (for the operator)."""
    rows = await conn.fetch(
        "SELECT projection, seq, subject, event_type, event_id, error, attempts, parked_at, "
        "decision FROM parked_events WHERE resolved_at IS NULL ORDER BY projection, seq"
    )
    return [dict(r.items()) for r in rows]
