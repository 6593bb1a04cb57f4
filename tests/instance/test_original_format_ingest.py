"""Ingest of fleet devices' messages in the original agent's wire format, against a real
Postgres (and, for delivery, a real Mosquitto): batches stored reading by reading at their own
times, bad messages dead-lettered with their index, heartbeats, configuration reports, the
temperature offset applied once, quota and read-only rules per reading, redelivery stored once.
The fleet device is made in the database here; tests/instance/test_original_format.py registers
one through the API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid as uuids
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from test_storage import (  # noqa: F401 - database is a fixture
    database,
    ingest_for,
    stored_once,
    until,
)

from libs.mqtt.dynsec import DynSec, subtree_acls
from libs.servers.mosquitto import EmbeddedMosquitto
from services.instance import fleet
from services.instance.ingest import Ingest
from services.instance.settings import ingest_client_id

pytestmark = pytest.mark.slow

UUID = "5f0c2b8e-7d1a-4c3e-9b7a-2e4f6a8c0d1e"


@pytest.fixture
def fleet_database(database: tuple[str, asyncpg.Pool]) -> tuple[str, asyncpg.Pool]:  # noqa: F811
    """A fresh instance database and a pool on it (test_storage's)."""
    return database


async def fleet_ingest(
    url: str, pool: asyncpg.Pool | None, **settings: Any
) -> tuple[Ingest, str, CollectorRegistry]:
    """An ingest with fleet device ``f1`` (uuid ``UUID``) known; the device's sensor topic."""
    registry = CollectorRegistry()
    ingest, _ = await ingest_for(url, pool, registry, **settings)
    conn = await asyncpg.connect(url, server_settings={"search_path": "instance"})
    try:
        await conn.execute(
            "INSERT INTO devices (device_id, name, mqtt_username, created_at, uuid, device_type) "
            "VALUES ('f1', 'f1', $1, now(), $2, 'bme688')",
            fleet.broker_username(UUID),
            UUID,
        )
    finally:
        await conn.close()
    if pool is not None:
        await ingest.load_usage()
    return ingest, fleet.sensor_topic(UUID, "bme688"), registry


def message(at: datetime, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "sensor_name": "bme688",
        "temperature": 21.5,
        "humidity": 45.0,
        "pressure": 101325.0,
        "gas_resistance": 125000.0,
        "timestamp": at.isoformat().replace("+00:00", "Z"),
    }
    return body | overrides


def batch(*messages: Any) -> bytes:
    return json.dumps(
        {"sensor": "bme688", "timestamp": datetime.now(UTC).isoformat(), "messages": messages}
    ).encode()


async def readings_of(pool: asyncpg.Pool, device_id: str = "f1") -> list[dict[str, Any]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT ts, temperature::text::float8 AS temperature, "
            "pressure::text::float8 AS pressure, temperature_offset::text::float8 AS "
            "temperature_offset FROM readings WHERE device_id = $1 ORDER BY ts",
            device_id,
        )
    return [dict(r) for r in rows]


async def dead_letters(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT topic, device_id, reason, payload FROM dead_letters")
    return [dict(r) for r in rows]


async def test_a_batch_stores_its_good_messages_at_their_times_and_refuses_the_bad(
    fleet_database,
) -> None:
    url, pool = fleet_database
    ingest, topic, registry = await fleet_ingest(url, pool)
    now = datetime.now(UTC).replace(microsecond=0)
    times = [now - timedelta(seconds=s) for s in (30, 20, 10)]
    payload = batch(
        message(times[0]),
        message(times[1], humidity=140),
        json.dumps(message(times[1], pressure=1009.5)),  # a JSON string, in hPa
        "{broken",
        message(times[2], temperature=19.25),
    )
    ingest.receive(topic, payload, 7)
    assert ingest._batch.acks == [7]  # one packet, one acknowledgement
    assert await ingest.flush() == 3
    assert await readings_of(pool) == [
        {"ts": times[0], "temperature": 21.5, "pressure": 1013.25, "temperature_offset": None},
        {"ts": times[1], "temperature": 21.5, "pressure": 1009.5, "temperature_offset": None},
        {"ts": times[2], "temperature": 19.25, "pressure": 1013.25, "temperature_offset": None},
    ]
    dead = await dead_letters(pool)
    assert [(d["topic"], d["device_id"]) for d in dead] == [(topic, "f1")] * 2
    assert [d["reason"] for d in dead] == [
        "invalid: message 1: Expected `float` <= 100.0 - at `$.humidity`",
        "malformed: message 3: JSON is malformed: object keys must be strings (byte 1)",
    ]
    assert json.loads(dead[0]["payload"])["humidity"] == 140
    assert dead[1]["payload"] == b"{broken"
    usage = await stored_once(pool)
    assert (usage["mqtt_messages"], usage["stored_readings"]) == (3, 3)
    async with pool.acquire() as conn:
        day = await conn.fetchrow("SELECT rejected_readings FROM usage_days")
        device = await conn.fetchrow("SELECT status, last_seen FROM devices WHERE device_id='f1'")
    assert day["rejected_readings"] == 2
    assert device["status"] == "online" and device["last_seen"] is not None
    assert ingest.accepted_today == 3
    assert registry.get_sample_value("iotistic_instance_readings_stored_total") == 3


async def test_a_heartbeat_marks_the_device_online_and_stores_nothing(fleet_database) -> None:
    url, pool = fleet_database
    ingest, _, _ = await fleet_ingest(url, pool)
    ingest.receive(fleet.sensor_topic(UUID, "heartbeat"), b'{"status": "alive", "uptime": 5}')
    ingest.receive(fleet.config_topic(UUID), b'{"version": 1}', 3)  # our own publish: ignored
    await ingest.flush()
    async with pool.acquire() as conn:
        device = await conn.fetchrow("SELECT status, last_seen FROM devices WHERE device_id='f1'")
        usage = await conn.fetchrow("SELECT mqtt_messages, rejected_readings FROM usage_days")
    assert device["status"] == "online" and device["last_seen"] is not None
    assert await readings_of(pool) == [] and await dead_letters(pool) == []
    assert (usage["mqtt_messages"], usage["rejected_readings"]) == (0, 0)


async def test_what_is_not_a_batch_and_other_topics_are_dead_letters(fleet_database) -> None:
    url, pool = fleet_database
    ingest, topic, _ = await fleet_ingest(url, pool)
    ingest.receive(topic, b"[1, 2]")
    ingest.receive(f"{fleet.device_root(UUID)}/logs", b"hello")
    stranger = "0badc0de-0000-4000-8000-000000000000"
    ingest.receive(fleet.sensor_topic(stranger, "bme688"), batch(message(datetime.now(UTC))))
    ingest._devices_loaded_at = -1.0  # looked up again at once, and still unknown
    await ingest.flush()
    dead = await dead_letters(pool)
    assert sorted((d["device_id"] or "", d["reason"]) for d in dead) == [
        ("", "unknown device"),
        ("f1", "invalid: a readings batch is a JSON object with a messages list"),
        ("f1", "unknown topic"),
    ]
    assert await readings_of(pool) == []


async def test_a_device_registered_meanwhile_is_looked_up_before_its_batch_is_refused(
    fleet_database,
) -> None:
    url, pool = fleet_database
    ingest, _, _ = await fleet_ingest(url, pool)
    other = "7e57ab1e-1111-4222-8333-444455556666"
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO devices (device_id, name, mqtt_username, created_at, uuid) "
            "VALUES ('f2', 'f2', $1, now(), $2)",
            fleet.broker_username(other),
            other,
        )
    ingest._devices_loaded_at = -1.0  # the last look-up was long ago
    ingest.receive(fleet.sensor_topic(other, "bme688"), batch(message(datetime.now(UTC))))
    assert await ingest.flush() == 1
    assert len(await readings_of(pool, "f2")) == 1
    ingest.forget_device("f2")  # deleted: refused from now on
    ingest._devices_loaded_at = asyncio.get_running_loop().time()  # no look-up for a second
    ingest.receive(fleet.sensor_topic(other, "bme688"), batch(message(datetime.now(UTC))))
    ingest.know_fleet_device("f2", other)  # registered again, as registration tells ingest
    assert await ingest.flush() == 1
    assert len(await readings_of(pool, "f2")) == 2


async def test_a_report_is_stored_and_a_bad_one_is_a_dead_letter(fleet_database) -> None:
    url, pool = fleet_database
    ingest, _, _ = await fleet_ingest(url, pool)
    reported = fleet.reported_topic(UUID)
    ingest.receive(reported, b'{"version": 0, "reporting_interval": 30}')
    await ingest.flush()
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM device_config WHERE device_id = 'f1'")
    # No desired configuration yet: a row at version 0 (shown as nothing desired).
    assert (row["version"], row["desired"], row["published_version"]) == (0, "{}", 0)
    assert json.loads(row["reported"]) == {"reporting_interval": 30}
    assert row["reported_version"] == 0 and row["reported_at"] is not None
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE device_config SET desired = '{\"reporting_interval\": 60}', version = 4 "
            "WHERE device_id = 'f1'"
        )
    ingest.receive(reported, b'{"version": 4, "reporting_interval": 60}', 9)
    ingest.receive(reported, b'{"reporting_interval": 60}')
    await ingest.flush()
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM device_config WHERE device_id = 'f1'")
    assert row["version"] == 4 and row["reported_version"] == 4
    assert json.loads(row["desired"]) == json.loads(row["reported"]) == {"reporting_interval": 60}
    (dead,) = await dead_letters(pool)
    assert dead["reason"] == "report invalid: Object missing required field `version`"


async def test_the_temperature_offset_is_applied_until_the_device_reports_applying_it(
    fleet_database,
) -> None:
    url, pool = fleet_database
    ingest, topic, _ = await fleet_ingest(url, pool)
    now = datetime.now(UTC).replace(microsecond=0)
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO device_config (device_id, desired, version, desired_at) "
            "VALUES ('f1', '{\"temperature_offset\": -1.5}', 1, now())"
        )
    ingest.config_changed("f1")  # as the configuration API does
    ingest.receive(topic, batch(message(now - timedelta(seconds=9), temperature=25.0)))
    await ingest.flush()  # the offsets are loaded before this batch is taken...
    ingest.receive(topic, batch(message(now - timedelta(seconds=8), temperature=25.0)))
    await ingest.flush()  # ...and apply to those taken after
    ingest.receive(fleet.reported_topic(UUID), b'{"version": 1, "temperature_offset": -1.5}')
    ingest.receive(topic, batch(message(now - timedelta(seconds=7), temperature=23.5)))
    await ingest.flush()
    shown = await readings_of(pool)
    assert [(r["temperature"], r["temperature_offset"]) for r in shown] == [
        (25.0, None),
        (23.5, -1.5),  # sent 25.0, stored with the offset, which is recorded
        (23.5, None),  # the device applied it itself: not again
    ]
    # A new offset the device has not applied yet: the platform adds only the difference.
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE device_config SET desired = '{\"temperature_offset\": -2.0}', version = 2"
        )
    ingest.config_changed("f1")
    ingest.receive(topic, batch(message(now - timedelta(seconds=6))))
    await ingest.flush()
    ingest.receive(topic, batch(message(now - timedelta(seconds=5), temperature=23.5)))
    await ingest.flush()
    last = (await readings_of(pool))[-1]
    assert (last["temperature"], last["temperature_offset"]) == (23.0, -0.5)


async def test_the_daily_quota_counts_each_reading_of_a_batch(fleet_database) -> None:
    url, pool = fleet_database
    ingest, topic, _ = await fleet_ingest(url, pool)
    ingest.accepted_today = 100_000 - 2
    now = datetime.now(UTC)
    ingest.receive(topic, batch(*(message(now - timedelta(seconds=s)) for s in range(5))))
    assert await ingest.flush() == 2
    async with pool.acquire() as conn:
        usage = await conn.fetchrow("SELECT * FROM usage_days")
    assert (usage["mqtt_messages"], usage["over_quota_readings"]) == (2, 3)


async def test_a_batch_delivered_again_after_a_reconnect_is_stored_once(
    fleet_database, broker: EmbeddedMosquitto
) -> None:
    """Over a real broker at QoS 1: the batch waits, unacknowledged, for the database; the
    broker drops ingest's connection and delivers it again; each reading is stored once."""
    url, pool = fleet_database
    reachable: list[asyncpg.Pool] = []
    username, password = f"ingest-{uuids.uuid4().hex[:8]}", uuids.uuid4().hex
    ingest, topic, registry = await fleet_ingest(
        url,
        None,
        mqtt_host=broker.host,
        mqtt_port=broker.port,
        mqtt_username=username,
        mqtt_password=password,
        ingest_flush_seconds=0.05,
    )
    ingest.know_fleet_device("f1", UUID)
    ingest._pool = lambda: reachable[0] if reachable else None  # the database comes back later
    admin = (broker.host, broker.port, broker.admin_username, broker.admin_password)
    device_user = fleet.broker_username(UUID)
    role = fleet.fleet_role(username)
    async with DynSec(*admin) as dynsec:
        await dynsec.ensure_role(username, subtree_acls(ingest._settings.instance_customer_id))
        await dynsec.ensure_role(role, fleet.fleet_role_acls([UUID]))
        await dynsec.ensure_client(
            username,
            password,
            [username, role],
            clientid=ingest_client_id(ingest._settings),
            priorities={role: 1},
        )
        await dynsec.ensure_role(device_user, fleet.device_acls(UUID))
        await dynsec.ensure_client(device_user, "device-password", [device_user], clientid=UUID)
    running = asyncio.create_task(ingest.run())
    try:
        await until(
            lambda: ingest._subscriber is not None and ingest._subscriber.subscribed.is_set(),
            "ingest subscribed",
        )
        count = 200
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
        async with aiomqtt.Client(
            broker.host,
            broker.port,
            username=device_user,
            password="device-password",
            identifier=UUID,
        ) as mqtt:
            for first in range(0, count, 50):
                messages = [message(start + timedelta(seconds=i)) for i in range(first, first + 50)]
                await mqtt.publish(topic, batch(*messages), qos=1)
        await until(lambda: ingest.accepted_today == count, "every reading buffered")
        async with DynSec(*admin) as dynsec:
            await dynsec.command("disableClient", username=username)
            await until(lambda: not ingest._subscriber.subscribed.is_set(), "disconnected")
            await dynsec.command("enableClient", username=username)
        await until(lambda: ingest.accepted_today == 2 * count, "the batches delivered again")
        reachable.append(pool)
        await until(
            lambda: registry.get_sample_value("iotistic_instance_mqtt_messages_total") == 8,
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
