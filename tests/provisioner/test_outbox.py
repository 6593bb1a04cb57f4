"""The provisioner's outbox relay, on a real Postgres and JetStream: events reach the log in
order, and an append failing halfway through a batch does not send the ones before it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import asyncpg
import pytest

from contracts import DeploymentRequested, MalformedEvent, decode_envelope
from libs.eventlog.store import EventStore
from libs.runtime.outbox import OutboxRelay, add_to_outbox
from support import eventually


def requested(job_id: str) -> DeploymentRequested:
    return DeploymentRequested(
        customer_id="c-outbox", job_id=job_id, kind="deploy-customer-stack", priority=3
    )


async def outbox_jobs(pool: asyncpg.Pool) -> list[str]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT envelope FROM outbox ORDER BY id")
    return [json.loads(bytes(decode_envelope(r["envelope"]).data))["job_id"] for r in rows]


async def logged_jobs(store: EventStore) -> list[str]:
    found = []
    async for message in store.read(event_types=["DeploymentRequested"]):
        found.append(json.loads(bytes(decode_envelope(message.data).data))["job_id"])
    return found


async def test_an_append_failing_midway_keeps_the_events_appended_before_it_sent(
    pool, store
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        for job_id in ("j1", "j2"):
            await add_to_outbox(conn, requested(job_id), customer_id="c-outbox")
        # An event that cannot be appended (it does not decode) stops the batch here.
        await conn.execute(
            "INSERT INTO outbox (event_id, subject_key, envelope) VALUES ('bad', 'c-outbox', $1)",
            b"not an envelope",
        )
        await add_to_outbox(conn, requested("j3"), customer_id="c-outbox")
    relay = OutboxRelay(lambda: pool, lambda: store, "provisioner:outbox")
    with pytest.raises(MalformedEvent):
        await relay.relay_once()
    assert await logged_jobs(store) == ["j1", "j2"]
    async with pool.acquire() as conn:
        waiting = await conn.fetch("SELECT event_id, envelope FROM outbox ORDER BY id")
    # What reached the log left the outbox; the rest waits, in order.
    assert [r["event_id"] for r in waiting[:1]] == ["bad"]
    assert [
        json.loads(bytes(decode_envelope(r["envelope"]).data))["job_id"] for r in waiting[1:]
    ] == ["j3"]

    async with pool.acquire() as conn:
        await conn.execute("DELETE FROM outbox WHERE event_id = 'bad'")
    assert await relay.relay_once() == 1
    assert await outbox_jobs(pool) == []
    assert await logged_jobs(store) == ["j1", "j2", "j3"]


async def test_a_row_the_log_will_not_take_holds_the_relay_without_stopping_it(
    pool, store, caplog
) -> None:
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO outbox (event_id, subject_key, envelope) VALUES ('bad', 'c-outbox', $1)",
            b"not an envelope",
        )
        await add_to_outbox(conn, requested("after-bad"), customer_id="c-outbox")
    relay = OutboxRelay(lambda: pool, lambda: store, "provisioner:outbox", poll_seconds=0.05)
    running = asyncio.create_task(relay.run())
    try:
        await eventually(
            lambda: asyncio.sleep(0, result=caplog.text),
            lambda text: "cannot append the oldest event" in text,
            what="the relay's error",
        )
        assert not running.done()
        assert "after-bad" not in await logged_jobs(store)  # in order: it waits behind
        async with pool.acquire() as conn:
            await conn.execute("DELETE FROM outbox WHERE event_id = 'bad'")
        relay.wake()
        await eventually(
            lambda: logged_jobs(store), lambda jobs: "after-bad" in jobs, what="the next event"
        )
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
