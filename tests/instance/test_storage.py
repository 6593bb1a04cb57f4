"""The instance's storage and ingest on a real Postgres: retention drops whole day partitions,
the daily message quota drops and counts what is over it, nothing is half-stored."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from litestar import Litestar, get
from prometheus_client import CollectorRegistry

from libs.db import create_pool, load_migrations, migrate
from services.instance.ingest import Ingest, IngestMetrics
from services.instance.license import LicenseHolder
from services.instance.readings import drop_expired_partitions, store_readings
from services.instance.settings import InstanceSettings
from support import create_database, license_keys_dir, serving, signed_license_issued


@pytest.fixture
async def database(postgres_server_url: str) -> AsyncIterator[tuple[str, asyncpg.Pool]]:
    url = await create_database(postgres_server_url)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, "instance", load_migrations("services.instance.migrations", "service"))
    finally:
        await conn.close()
    pool = await create_pool(url, "instance", max_size=3)
    try:
        yield url, pool
    finally:
        await pool.close()


def row(device: str, ts: datetime, temperature: float = 20.0) -> tuple[Any, ...]:
    return (device, ts, temperature, 40.0, 1010.0, 1.0e5, 50.0, 3, 600.0, 0.8)


async def test_retention_drops_whole_old_partitions_and_their_rollups(database) -> None:
    _, pool = database
    today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    known: set[Any] = set()
    async with pool.acquire() as conn, conn.transaction():
        await store_readings(
            conn, [row("d1", today - timedelta(days=days)) for days in (0, 1, 10, 40)], known
        )
    async with pool.acquire() as conn:
        dropped = await drop_expired_partitions(conn, (today - timedelta(days=30)).date())
        left = await conn.fetch("SELECT ts FROM readings ORDER BY ts")
        hours = await conn.fetchval("SELECT count(DISTINCT hour) FROM readings_hourly")
    assert dropped == [f"readings_{(today - timedelta(days=40)):%Y%m%d}"]
    assert [r["ts"] for r in left] == [today - timedelta(days=d) for d in (10, 1, 0)]
    assert hours == 3


async def test_the_daily_quota_drops_and_counts_the_readings_over_it(database) -> None:
    url, pool = database
    customer_id = str(uuid.uuid4())
    event = signed_license_issued(customer_id)
    from services.licensing.keys import load_keyring

    keyring = load_keyring(Path(license_keys_dir()))

    @get("/jwks")
    async def jwks() -> dict[str, Any]:
        return keyring.jwks()

    async with serving(Litestar([jwks])) as control:
        settings = InstanceSettings(
            instance_customer_id=customer_id,
            database_url=url,
            license_jwt=event.jwt,
            license_jwks_url=f"{control.base_url}/jwks",
        )
        holder = LicenseHolder(settings, CollectorRegistry())
        await holder.load()
    assert holder.claims is not None and holder.claims.limits.mqttMessagesPerDay == 100_000
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO devices (device_id, name, mqtt_username, created_at) "
            "VALUES ('d1', 'd1', 'u1', now())"
        )
    ingest = Ingest(settings, lambda: pool, holder, IngestMetrics(CollectorRegistry()))
    ingest.accepted_today = 100_000 - 2  # as if the day had almost used its quota
    topic = f"{customer_id}/devices/d1/readings"
    now = datetime.now(UTC)
    for index in range(5):
        body = {
            "ts": (now - timedelta(seconds=index)).isoformat(),
            "temperature": 20 + index,
            "humidity": 40,
            "pressure": 1000,
            "gas_resistance": 1e5,
        }
        ingest.receive(topic, json.dumps(body).encode())
    ingest.receive(f"{customer_id}/devices/nobody/readings", b"{}")
    assert await ingest.flush() == 2
    async with pool.acquire() as conn:
        stored = await conn.fetchval("SELECT count(*) FROM readings")
        usage = await conn.fetchrow("SELECT * FROM usage_days")
        dead = await conn.fetch("SELECT reason FROM dead_letters")
    assert stored == 2
    assert (usage["mqtt_messages"], usage["over_quota_readings"]) == (2, 3)
    assert [d["reason"] for d in dead] == ["unknown device"]
