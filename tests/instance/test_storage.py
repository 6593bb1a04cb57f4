"""The instance's storage and ingest on a real Postgres (and a real Mosquitto where the broker
matters): retention drops whole day partitions, the daily message quota drops and counts what
is over it, nothing is half-stored, and a reading delivered twice is stored and counted once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
import asyncpg
import pytest
from litestar import Litestar, get
from prometheus_client import CollectorRegistry

from libs.db.postgres import create_pool, load_migrations, migrate
from libs.mqtt.dynsec import DynSec, device_acls, subtree_acls
from libs.servers.mosquitto import EmbeddedMosquitto
from services.instance.fleet import fleet_role, fleet_role_acls
from services.instance.ingest import Ingest, IngestMetrics
from services.instance.license import LicenseHolder
from services.instance.readings import (
    COLUMNS,
    ROLLUP_SQL,
    drop_expired_partitions,
    ensure_partitions,
    store_readings,
)
from services.instance.settings import InstanceSettings, ingest_client_id
from support import create_database, eventually, license_keys_dir, serving, signed_license_issued


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
    return (device, ts, temperature, 40.0, 1010.0, 1.0e5, 50.0, 3, 600.0, 0.8, None)


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
    url: str,
    pool: asyncpg.Pool | None,
    registry: CollectorRegistry,
    on_stored: Callable[[list[tuple[Any, ...]]], None] | None = None,
    **settings: Any,
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
    ingest = Ingest(instance, lambda: pool, holder, IngestMetrics(registry), on_stored)
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


async def stored_once(pool: asyncpg.Pool) -> dict[str, int]:
    """Rows, distinct readings, the temperature rollups' count and today's usage counts."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            """
            SELECT (SELECT count(*) FROM readings) AS rows,
                   (SELECT count(DISTINCT (device_id, ts)) FROM readings) AS distinct_readings,
                   (SELECT coalesce(sum(n), 0)::bigint FROM readings_hourly
                    WHERE metric = 'temperature') AS rolled_up,
                   (SELECT coalesce(sum(mqtt_messages), 0)::bigint FROM usage_days)
                       AS mqtt_messages,
                   (SELECT coalesce(sum(stored_readings), 0)::bigint FROM usage_days)
                       AS stored_readings
            """
        )
    return dict(row)


async def test_a_reading_received_twice_is_stored_rolled_up_and_counted_once(database) -> None:
    url, pool = database
    registry = CollectorRegistry()
    shown: list[tuple[Any, ...]] = []  # what the dashboard's live charts are given
    ingest, topic = await ingest_for(url, pool, registry, shown.extend)
    now = datetime.now(UTC).replace(microsecond=0)
    first = [body(now - timedelta(seconds=i), 20 + i) for i in range(5)]
    for payload in first + first[:2]:  # two of them twice in the same batch
        ingest.receive(topic, payload)
    assert await ingest.flush() == 5
    for payload in [*first[2:], body(now - timedelta(seconds=10))]:  # three again, one new
        ingest.receive(topic, payload)
    assert await ingest.flush() == 1
    assert await stored_once(pool) == {
        "rows": 6,
        "distinct_readings": 6,
        "rolled_up": 6,
        "mqtt_messages": 6,
        "stored_readings": 6,
    }
    assert ingest.accepted_today == 6  # the copies do not use the day's quota
    assert sorted(r[1] for r in shown) == [now - timedelta(seconds=s) for s in (10, 4, 3, 2, 1, 0)]
    assert registry.get_sample_value("iotistic_instance_readings_repeated_total") == 5


async def until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait for ``condition``; fail naming ``what`` after ``timeout`` seconds."""

    async def holds() -> bool:
        return condition()

    await eventually(holds, timeout=timeout, what=what)


async def test_readings_delivered_again_after_a_reconnect_are_stored_once(
    database, broker: EmbeddedMosquitto
) -> None:
    """The broker drops ingest's connection while its readings wait, unacknowledged, for the
    database; on the next connection it delivers them again. Both copies reach ingest; one of
    each is stored, rolled up and counted."""
    url, pool = database
    registry = CollectorRegistry()
    reachable: list[asyncpg.Pool] = []
    username, password = f"ingest-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    ingest, topic = await ingest_for(
        url,
        None,
        registry,
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        mqtt_username=username,
        mqtt_password=password,
        ingest_flush_seconds=0.05,
    )
    ingest._pool = lambda: reachable[0] if reachable else None  # the database comes back later
    ingest.know_device("d1")  # as the app does when it registers one
    customer_id = topic.split("/")[0]
    client_id = ingest_client_id(ingest._settings)
    admin = (broker.host, broker.port, broker.admin_username, broker.admin_password)
    device = f"device-{uuid.uuid4().hex[:8]}"
    async with DynSec(*admin) as dynsec:
        await dynsec.ensure_role(username, subtree_acls(customer_id))
        # As the instance makes its ingest client: it subscribes to the fleet's topics too.
        fleet = fleet_role(username)
        await dynsec.create_role(fleet, fleet_role_acls([]))
        await dynsec.ensure_client(
            username, password, [username, fleet], clientid=client_id, priorities={fleet: 1}
        )
        await dynsec.ensure_role(device, device_acls([topic]))
        await dynsec.ensure_client(device, "device-password", [device])
    running = asyncio.create_task(ingest.run())
    try:
        await until(
            lambda: ingest._subscriber is not None and ingest._subscriber.subscribed.is_set(),
            "ingest subscribed",
        )
        count = 50
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
        async with aiomqtt.Client(
            broker.host, broker.port, username=device, password="device-password"
        ) as mqtt:
            for i in range(count):
                await mqtt.publish(topic, body(start + timedelta(seconds=i), 20 + i % 10), qos=1)
        await until(lambda: ingest.accepted_today == count, "every reading buffered")
        async with DynSec(*admin) as dynsec:
            # The broker ends the connection of a disabled client; enabled again, it reconnects
            # to its session, whose messages were never acknowledged.
            await dynsec.command("disableClient", username=username)
            await until(lambda: not ingest._subscriber.subscribed.is_set(), "disconnected")
            await dynsec.command("enableClient", username=username)
        await until(lambda: ingest.accepted_today == 2 * count, "the readings delivered again")
        reachable.append(pool)
        await until(
            lambda: registry.get_sample_value("iotistic_instance_mqtt_messages_total") == 2 * count,
            "both deliveries written",
        )
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert await stored_once(pool) == {
        "rows": count,
        "distinct_readings": count,
        "rolled_up": count,
        "mqtt_messages": count,
        "stored_readings": count,
    }
    assert ingest.accepted_today == count


async def test_a_database_with_readings_stored_twice_upgrades_to_one_of_each(
    postgres_server_url: str,
) -> None:
    """Before readings had a key, a redelivery stored a second copy and counted it in the
    rollups. The migration that adds the key keeps one copy and rebuilds those hours."""
    url = await create_database(postgres_server_url)
    migrations = load_migrations("services.instance.migrations", "service")
    before = [m for m in migrations if m.name < "003"]
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    rows = [row("d1", hour + timedelta(minutes=i), 20.0 + i) for i in range(3)]
    twice = [*rows, rows[0], rows[0], row("d2", hour, 30.0), row("d2", hour, 30.0)]
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, "instance", before)
        await conn.execute("SET search_path TO instance")
        async with conn.transaction():
            await ensure_partitions(conn, {hour.date()}, set())
            await conn.copy_records_to_table(
                "readings", records=[r[: len(COLUMNS)] for r in twice], columns=COLUMNS
            )
            await conn.execute(ROLLUP_SQL.format(source="readings"))  # as the old ingest did
        assert await conn.fetchval("SELECT sum(n) FROM readings_hourly") == 7 * 8
        await migrate(conn, "instance", migrations)
        assert await conn.fetchval("SELECT count(*) FROM readings") == 4
        rollups = await conn.fetch(
            "SELECT device_id, n, total, low, high FROM readings_hourly "
            "WHERE metric = 'temperature' ORDER BY device_id"
        )
        assert [tuple(r) for r in rollups] == [
            ("d1", 3, 63.0, 20.0, 22.0),
            ("d2", 1, 30.0, 30.0, 30.0),
        ]
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "INSERT INTO readings (device_id, ts, temperature, humidity, pressure, "
                "gas_resistance) VALUES ('d1', $1, 1, 1, 1000, 1)",
                hour,
            )
    finally:
        await conn.close()
