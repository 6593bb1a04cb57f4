"""Dead letters: the messages ingest could not take, each with its reason, for the customer to
see what their devices sent wrong (payloads kept up to ``DEAD_LETTER_PAYLOAD`` bytes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

DEAD_LETTER_PAYLOAD = 4096


async def record_dead_letters(conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Store rows of ``(received_at, topic, device_id, reason, payload)``."""
    await conn.executemany(
        "INSERT INTO dead_letters (received_at, topic, device_id, reason, payload) "
        "VALUES ($1, $2, $3, $4, $5)",
        rows,
    )


async def latest_dead_letters(conn: asyncpg.Connection, limit: int = 100) -> list[dict[str, Any]]:
    """The newest dead letters first, their payloads cut to 512 bytes as text."""
    rows = await conn.fetch(
        "SELECT id, received_at, topic, device_id, reason, "
        "convert_from(substring(payload for 512), 'SQL_ASCII') AS payload "
        "FROM dead_letters ORDER BY id DESC LIMIT $1",
        limit,
    )
    return [dict(r) for r in rows]


async def count_dead_letters(conn: asyncpg.Connection) -> int:
    """How many dead letters are kept."""
    return int(await conn.fetchval("SELECT count(*) FROM dead_letters"))
