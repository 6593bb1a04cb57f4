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


async def ingest_for(
    url: str, pool: asyncpg.Pool | None, registry: CollectorRegistry, **settings: Any
) -> tuple[Ingest, str]:
    """An ingest of a new customer with a starter license and device ``d1``; its topic."""
    customer_id = str(uuid.uuid4())
    event = signed_license_issued(customer_id)
    from services.licensing.keys import load_keyring

    keyring = load_keyring(Path(license_keys_dir()))

    @get("/jwks")
    async def jwks() -> dict[str, Any]:
        return keyring.jwks()

    async with serving(Litestar([jwks])) as control:
        instance = InstanceSettings(
            instance_customer_id=customer_id,
            database_url=url,
            license_jwt=event.jwt,
            license_jwks_url=f"{control.base_url}/jwks",
            **settings,
        )
        holder = LicenseHolder(instance, CollectorRegistry())
        await holder.load()
    assert holder.claims is not None and holder.claims.limits.mqttMessagesPerDay == 100_000
    conn = await asyncpg.connect(url, server_settings={"search_path": "instance"})
    try:
        await conn.execute(
            "INSERT INTO devices (device_id, name, mqtt_username, created_at) "
            "VALUES ('d1', 'd1', 'u1', now())"
        )
    finally:
        await conn.close()
    ingest = Ingest(instance, lambda: pool, holder, IngestMetrics(registry))
    return ingest, f"{customer_id}/devices/d1/readings"


def body(ts: datetime | str, temperature: float = 20.0) -> bytes:
    stamp = ts if isinstance(ts, str) else ts.isoformat()
    return json.dumps(
        {
            "ts": stamp,
            "temperature": temperature,
            "humidity": 40,
            "pressure": 1000,
            "gas_resistance": 1e5,
        }
    ).encode()


async def test_the_daily_quota_drops_and_counts_the_readings_over_it(database) -> None:
    url, pool = database
    ingest, topic = await ingest_for(url, pool, CollectorRegistry())
    ingest.accepted_today = 100_000 - 2  # as if the day had almost used its quota
    now = datetime.now(UTC)
    for index in range(5):
        ingest.receive(topic, body(now - timedelta(seconds=index), 20 + index))
    ingest.receive(topic.replace("/d1/", "/nobody/"), b"{}")
    assert await ingest.flush() == 2
    async with pool.acquire() as conn:
        stored = await conn.fetchval("SELECT count(*) FROM readings")
        usage = await conn.fetchrow("SELECT * FROM usage_days")
        dead = await conn.fetch("SELECT reason FROM dead_letters")
    assert stored == 2
    assert (usage["mqtt_messages"], usage["over_quota_readings"]) == (2, 3)
    assert [d["reason"] for d in dead] == ["unknown device"]


async def test_a_time_at_the_edge_of_the_calendar_is_a_dead_letter(database) -> None:
    url, pool = database
    ingest, topic = await ingest_for(url, pool, CollectorRegistry())
    for edge in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"):
        ingest.receive(topic, body(edge))
    ingest.receive(topic, body(datetime.now(UTC)))
    assert await ingest.flush() == 1
    async with pool.acquire() as conn:
        dead = await conn.fetch("SELECT reason FROM dead_letters")
    assert [d["reason"] for d in dead] == ["invalid: ts is out of range"] * 2


async def test_a_failed_write_makes_its_day_partition_again_on_the_next_try(database) -> None:
    url, pool = database
    ingest, topic = await ingest_for(url, pool, CollectorRegistry())
    ingest.receive(topic, body(datetime.now(UTC) - timedelta(days=3)))
    # The write fails after it made the day's partition, which the rollback takes away again.
    async with pool.acquire() as conn:
        await conn.execute(
            "ALTER TABLE usage_days ADD CONSTRAINT refuse_all CHECK (mqtt_messages < 0)"
        )
    with pytest.raises(asyncpg.CheckViolationError):
        await ingest.flush()
    async with pool.acquire() as conn:
        await conn.execute("ALTER TABLE usage_days DROP CONSTRAINT refuse_all")
    assert await ingest.flush() == 1
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM readings") == 1


async def test_qos_0_readings_past_the_buffer_are_dropped_and_counted_while_the_db_is_away(
    database,
) -> None:
    url, pool = database
    registry = CollectorRegistry()
    reachable: list[asyncpg.Pool] = []
    ingest, topic = await ingest_for(url, None, registry, ingest_batch_rows=10)
    ingest._pool = lambda: reachable[0] if reachable else None  # the database comes back later
    now = datetime.now(UTC)
    for index in range(100):
        ingest.receive(topic, body(now - timedelta(milliseconds=index)))  # QoS 0
    assert await ingest.flush() == 0  # no database yet
    reachable.append(pool)
    assert await ingest.flush() == 40  # four batches' worth were kept
    dropped = registry.get_sample_value(
        "iotistic_instance_readings_rejected_total", {"reason": "buffer full (QoS 0)"}
    )
    assert dropped == 60
