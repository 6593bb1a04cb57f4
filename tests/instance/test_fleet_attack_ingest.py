"""Ingest against a fleet device that sends the worst batches the original wire format allows:
a thousand bad messages in one batch is not a thousand dead letters per MQTT message (a device
could otherwise make ingest buffer, and the database keep, a thousand times what it sent), but
the first ones and one more that says how many were refused; every one is still counted. Against
a real Postgres (test_storage's database)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import asyncpg
import pytest
from test_original_format_ingest import UUID, dead_letters, fleet_ingest, message, readings_of
from test_storage import database  # noqa: F401 - a fixture

from services.instance.fleet import reported_topic
from services.instance.intake import MAX_REFUSED_KEPT

pytestmark = pytest.mark.slow


async def test_a_batch_of_a_thousand_bad_messages_is_a_few_dead_letters_and_all_counted(
    database: tuple[str, asyncpg.Pool],  # noqa: F811
) -> None:
    url, pool = database
    ingest, topic, _ = await fleet_ingest(url, pool)
    now = datetime.now(UTC)
    bad = [json.dumps({"temperature": 999, "junk": "x" * 200}) for _ in range(999)]
    payload = json.dumps({"timestamp": now.isoformat(), "messages": [message(now), *bad]})
    for _ in range(3):  # the same batch again and again: each time as few dead letters
        ingest.receive(topic, payload.encode())
    await ingest.flush()

    reasons = [d["reason"] for d in await dead_letters(pool)]
    summaries = [r for r in reasons if r.startswith("invalid: messages ")]
    assert len(reasons) == 3 * (MAX_REFUSED_KEPT + 1) and len(summaries) == 3
    assert summaries[0].startswith(f"invalid: messages {MAX_REFUSED_KEPT + 1} to 999: ")
    assert f"{999 - MAX_REFUSED_KEPT} more" in summaries[0]
    singles = sorted({r.split(":")[1] for r in reasons if r not in summaries})
    assert singles == sorted(f" message {i}" for i in range(1, MAX_REFUSED_KEPT + 1))
    assert len(await readings_of(pool)) == 1
    async with pool.acquire() as conn:
        usage = await conn.fetchrow("SELECT * FROM usage_days")
    assert usage["rejected_readings"] == 3 * 999


@pytest.mark.parametrize(
    "report", [b'{"version": 1, "note": "a\\u0000b"}', b'{"version": 1, "a\\u0000": 1}']
)
async def test_a_report_postgres_cannot_store_is_a_dead_letter_and_ingest_goes_on(
    database: tuple[str, asyncpg.Pool],  # noqa: F811
    report: bytes,
) -> None:
    url, pool = database
    ingest, topic, _ = await fleet_ingest(url, pool)
    now = datetime.now(UTC)
    ingest.receive(reported_topic(UUID), report)
    ingest.receive(topic, json.dumps({"messages": [message(now)]}).encode())
    await ingest.flush()

    assert len(await readings_of(pool)) == 1
    reasons = [d["reason"] for d in await dead_letters(pool)]
    assert len(reasons) == 1 and reasons[0].startswith("report invalid: "), reasons
    async with pool.acquire() as conn:
        assert (
            await conn.fetchval("SELECT count(*) FROM device_config WHERE reported IS NOT NULL")
            == 0
        )
