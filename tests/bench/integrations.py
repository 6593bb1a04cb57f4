"""`just bench integrations`: what integrations cost ingest, and how fast they are sent.

On real Postgres 18 and a real HTTP receiver on loopback (litestar under uvicorn, in this
process): the cost of storing readings in batches of 500 as ingest does, without the trigger
that notes them for integrations (disabled while no integration takes readings), with it
enabled but unused, and with an integration taking readings (rounds interleaved, each mode
first once, medians: the machine may be shared); then the live delivery of those readings to
one integration, and a backfill at the highest rate a customer may ask
(``backfills.MAX_RATE``).
"""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
from litestar import Litestar, Request, post

from libs.db.postgres import load_migrations, migrate
from services.instance.integrations import backfills
from services.instance.integrations.sender import IntegrationSender
from services.instance.integrations.store import NewIntegration, create_integration
from services.instance.readings import store_readings
from services.instance.webhook_targets import WebhookTargets
from tests.support import create_database, serving

BATCH = 500
BATCHES = 100
ROUNDS = 3
BACKFILL_SECONDS = 10_000
VALUES = (20.5, 40.0, 1000.0, 1e5, 50.0, 3, 600.0, 0.5, None)


async def _database(pg_url: str) -> str:
    url = await create_database(pg_url)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, "instance", load_migrations("services.instance.migrations", "service"))
    finally:
        await conn.close()
    return url


async def _store_rate(conn: asyncpg.Connection, device: str) -> float:
    """Readings a second stored in batches of ``BATCH``, each in its own transaction."""
    start = datetime(2026, 11, 1, tzinfo=UTC)
    known: set[Any] = set()
    started = time.perf_counter()
    for n in range(BATCHES):
        first = start + timedelta(seconds=n * BATCH)
        rows = [(device, first + timedelta(seconds=i), *VALUES) for i in range(BATCH)]
        async with conn.transaction():
            await store_readings(conn, rows, known)
    return BATCHES * BATCH / (time.perf_counter() - started)


async def _sent(sender: IntegrationSender, done: Any) -> float:
    """Seconds the sender takes until ``done()``."""
    started = time.perf_counter()
    while not done():
        await sender.send_due(datetime.now(UTC))
        if time.perf_counter() - started > 900:
            raise TimeoutError("the integration did not receive everything")
    return time.perf_counter() - started


async def _store_rates(conn: asyncpg.Connection, integration_id: str) -> dict[str, float]:
    """The median store rate of ``ROUNDS`` rounds of each: without the trigger, with it and no
    integration taking readings, with one taking them (interleaved: the machine is shared)."""
    rates: dict[str, list[float]] = {"without": [], "idle": [], "taking": []}
    modes = list(rates)
    for round_ in range(ROUNDS):
        for mode in modes[round_ % 3 :] + modes[: round_ % 3]:  # each goes first once
            enabled = "DISABLE" if mode == "without" else "ENABLE"
            await conn.execute(f"ALTER TABLE readings {enabled} TRIGGER readings_for_integrations")
            await conn.execute(
                "UPDATE integrations SET kinds = $2 WHERE integration_id = $1",
                integration_id,
                ["readings"] if mode == "taking" else ["alert"],
            )
            rates[mode].append(await _store_rate(conn, f"{mode}-{round_}"))
    await conn.execute(
        "UPDATE integrations SET kinds = $2 WHERE integration_id = $1", integration_id, ["readings"]
    )
    await conn.execute("ALTER TABLE readings ENABLE TRIGGER readings_for_integrations")
    return {mode: statistics.median(values) for mode, values in rates.items()}


async def run(pg_url: str, nats_url: str) -> None:
    received = {"live": 0, "backfill": 0}

    @post("/hook", status_code=200)
    async def hook(request: Request[Any, Any, Any]) -> None:
        body = msgspec.json.decode(await request.body())
        received["backfill" if "backfill_id" in body else "live"] += len(body["readings"])

    url = await _database(pg_url)
    conn = await asyncpg.connect(url, server_settings={"search_path": "instance"})
    pool = await asyncpg.create_pool(url, server_settings={"search_path": "instance"})
    total = BATCHES * BATCH
    start = datetime(2026, 11, 1, tzinfo=UTC)
    try:
        await _store_rate(conn, "warm-up")  # makes the partitions, warms the caches
        async with serving(Litestar([hook])) as receiver:
            hook_url = f"{str(receiver.base_url).rstrip('/')}/hook"
            made = await create_integration(
                conn, NewIntegration(name="bench", url=hook_url, kinds=["alert"]), datetime.now(UTC)
            )
            rates = await _store_rates(conn, made["integration_id"])
            targets = WebhookTargets.from_setting("127.0.0.0/8")
            sender = IntegrationSender(lambda: pool, "bench", lambda: True, targets, every=0)
            try:
                live = await _sent(sender, lambda: received["live"] >= ROUNDS * total)
                # The first BACKFILL_SECONDS of every device's readings (one a second each).
                devices = 1 + 3 * ROUNDS
                span = (start, start + timedelta(seconds=BACKFILL_SECONDS), backfills.MAX_RATE)
                await backfills.start_backfill(
                    conn, made["integration_id"], span, datetime.now(UTC)
                )
                backfilled = await _sent(
                    sender, lambda: received["backfill"] >= devices * BACKFILL_SECONDS
                )
            finally:
                await sender.stop()
    finally:
        await pool.close()
        await conn.close()
    without = rates["without"]
    print(
        f"store {BATCH}-reading batches, no integration taking readings (the trigger disabled, "
        f"as the instance keeps it then): {without:,.0f} readings/s (median of {ROUNDS})"
    )
    for mode, text in (
        ("idle", "the trigger enabled, nothing taking readings (what disabling it saves)"),
        ("taking", "an integration taking readings"),
    ):
        print(
            f"store with {text}: {rates[mode]:,.0f} readings/s "
            f"({(without - rates[mode]) / without:+.1%} slower)"
        )
    sent = ROUNDS * total
    print(f"live delivery to one integration: {sent / live:,.0f} readings/s ({sent:,} readings)")
    print(
        f"backfill at the highest rate allowed ({backfills.MAX_RATE:,}/s): "
        f"{devices * BACKFILL_SECONDS / backfilled:,.0f} readings/s "
        f"({devices * BACKFILL_SECONDS:,} readings)"
    )
