"""The event log and projections: appends per second, and events applied per second."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from libs.eventlog.store import EventStore
from libs.projections.replay import replay_service
from services.licensing.app import LICENSING
from tests.support import (
    connect_harness,
    create_database,
    license_issued,
    make_platform,
    make_settings,
)

APPENDS = 3000
PROJECTED = 3000


async def run(pg_url: str, nats_url: str) -> None:
    settings = make_settings(await create_database(pg_url), nats_url)
    nc = await connect_harness(nats_url)
    store = EventStore(nc.jetstream(), settings)
    await store.ensure_stream()
    events = [license_issued() for _ in range(APPENDS)]

    started = time.perf_counter()
    for event in events[: APPENDS // 2]:
        await store.publish(event, customer_id=event.customer_id)
    serial = (APPENDS // 2) / (time.perf_counter() - started)
    print(f"events: append awaiting each ack (sync_interval always): {serial:,.0f}/s")

    started = time.perf_counter()
    window = 64
    pending = events[APPENDS // 2 :]
    for i in range(0, len(pending), window):
        await asyncio.gather(
            *(store.publish(e, customer_id=e.customer_id) for e in pending[i : i + window])
        )
    windowed = len(pending) / (time.perf_counter() - started)
    print(f"events: append with {window} acks in flight: {windowed:,.0f}/s")

    conn = await asyncpg.connect(settings.database_url)
    platform = make_platform(settings, [LICENSING])
    started = time.perf_counter()
    await platform.start()
    await platform.wait_started()
    last = await store.last_seq()
    while True:
        done = await conn.fetchval(
            "SELECT last_seq FROM licensing.projection_checkpoints WHERE projection = 'licenses'"
        )
        if done is not None and done >= last:
            break
        await asyncio.sleep(0.05)
    applied = PROJECTED / (time.perf_counter() - started)
    print(
        f"events: projection catching up {PROJECTED} events "
        f"(a transaction per fetched batch): {applied:,.0f}/s"
    )
    await platform.stop()

    started = time.perf_counter()
    report = await replay_service(
        conn,
        store,
        schema="licensing",
        migrations_package=LICENSING.migrations_package,
        projections=LICENSING.projections,
        verify=True,
    )
    elapsed = time.perf_counter() - started
    print(
        f"events: replay --verify of {report.events_read} events: {elapsed:.2f}s "
        f"({report.events_read / elapsed:,.0f}/s), {report.differences} differences"
    )
    await conn.close()
    await nc.jetstream().delete_stream(settings.events_stream)
    await nc.close()
