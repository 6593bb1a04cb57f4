"""Devices running the original Iotistic agent, registered with a provisioning key, publish in
its wire format and the customer sees their readings: batches at their own times, bad messages
dead-lettered each with its reason, JSON-string messages, pressure in pascals, heartbeats,
configuration reports, the temperature offset applied once, a batch delivered twice stored
once, and a kill -9 of the instance mid-stream losing nothing. Everything real: the control
plane, the instance, Postgres, NATS and Mosquitto.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fleet_steps import create_key, fleet_mqtt_client, provision_fleet_device
from test_instance import (  # noqa: F401 - client is a fixture
    Customer,
    client,
    customer,
    instance_database,
    stored_of,
)

from libs.servers.mosquitto import EmbeddedMosquitto
from services.instance import fleet
from services.provisioner.backends.local.processes import instances_running
from support import eventually

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def olga(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "olga@example.com")
    yield found
    await found.api.aclose()


@pytest.fixture(scope="module")
async def key(olga) -> str:
    return str((await create_key(olga, name="original agents"))["key"])


async def fleet_device(c: Customer, key: str) -> dict[str, Any]:
    return await provision_fleet_device(str(c.api.base_url), key)


def stamp(at: datetime) -> str:
    """As the original agent writes times: ISO 8601 in UTC with milliseconds and a Z."""
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def message(at: datetime, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "sensor_name": "bme688",
        "temperature": 21.5,
        "humidity": 45.0,
        "pressure": 101325.0,  # Pa, as the BME68x driver gives it
        "gas_resistance": 125000.0,
        "timestamp": stamp(at),
    }
    return body | overrides


def batch(*messages: Any) -> bytes:
    return json.dumps(
        {"sensor": "bme688", "timestamp": stamp(datetime.now(UTC)), "messages": list(messages)}
    ).encode()


async def publish(
    broker: EmbeddedMosquitto, device: dict[str, Any], *sent: tuple[str, bytes]
) -> None:
    async with fleet_mqtt_client(broker, device) as mqtt:
        for topic, payload in sent:
            await mqtt.publish(topic, payload, qos=1)


async def exported(
    c: Customer, device_id: str, start: datetime, *, restarting: bool = False
) -> list[dict[str, str]]:
    """The device's readings from ``start`` as its CSV gives them. ``restarting``: the
    instance may still be coming back (503 until its database answers), which reads as none
    yet."""
    answer = await c.api.get(
        f"/api/devices/{device_id}/readings.csv", params={"from": start.isoformat()}
    )
    if restarting and answer.status_code == 503:
        return []
    assert answer.status_code == 200, answer.text
    return list(csv.DictReader(io.StringIO(answer.text)))


async def test_a_batch_is_stored_at_its_own_times_and_its_bad_messages_are_dead_letters(
    olga, key, broker
) -> None:
    device = await fleet_device(olga, key)
    assert device["mqtt"]["topics"]["publish"] == f"iot/device/{device['uuid']}/#"
    start = (datetime.now(UTC) - timedelta(minutes=10)).replace(second=0, microsecond=0)
    times = [start + timedelta(minutes=m, seconds=15) for m in range(3)]
    payload = batch(
        message(times[0], temperature=20.5),
        message(times[1], humidity=140),
        json.dumps(message(times[1], temperature=21.25, pressure=1009.5)),  # hPa, as a string
        "not json",
        message(times[2], temperature=22.0),
    )
    await publish(broker, device, (fleet.sensor_topic(device["uuid"], "bme688"), payload))
    series = await eventually(
        lambda: olga.api.get(
            f"/api/devices/{device['id']}/readings",
            params={"bucket": "1m", "from": start.isoformat(), "metrics": "temperature,pressure"},
        ),
        lambda r: r.status_code == 200 and len(r.json()["series"]["temperature"]) == 3,
        what="the batch's readings",
    )
    temperature = series.json()["series"]["temperature"]
    assert [datetime.fromisoformat(p["t"]) for p in temperature] == [
        t.replace(second=0) for t in times
    ]
    assert [p["avg"] for p in temperature] == [20.5, 21.25, 22.0]
    assert [p["avg"] for p in series.json()["series"]["pressure"]] == [1013.25, 1009.5, 1013.25]
    rows = await exported(olga, device["id"], start)
    assert [datetime.fromisoformat(r["ts"]) for r in rows] == times
    assert {r["temperature_offset"] for r in rows} == {""}
    dead = (await olga.api.get("/api/dead-letters")).json()["dead_letters"]
    mine = [d for d in dead if d["device_id"] == device["id"]]
    reasons = sorted(d["reason"] for d in mine)
    assert len(reasons) == 2
    assert reasons[0] == "invalid: message 1: Expected `float` <= 100.0 - at `$.humidity`"
    assert reasons[1].startswith("malformed: message 3: JSON is malformed")
    assert all(d["topic"] == fleet.sensor_topic(device["uuid"], "bme688") for d in mine)


async def test_a_heartbeat_marks_the_device_online(olga, key, broker) -> None:
    device = await fleet_device(olga, key)
    path = f"/api/devices/{device['id']}"
    assert (await olga.api.get(path)).json()["online"] is False

    async def heartbeat() -> bool:
        """One heartbeat (QoS 0, as the agent sends it every so often), then whether the
        device shows online. A QoS 0 message is lost while ingest reconnects (the broker
        disconnects it whenever a registration changes its fleet role): the next one counts."""
        beat = json.dumps({"status": "online", "timestamp": stamp(datetime.now(UTC))}).encode()
        async with fleet_mqtt_client(broker, device) as mqtt:
            await mqtt.publish(fleet.sensor_topic(device["uuid"], "heartbeat"), beat, qos=0)
        return bool((await olga.api.get(path)).json()["online"])

    await eventually(heartbeat, interval=0.5, what="the device online")
    assert (await olga.api.get(path)).json()["latest"] is None  # a heartbeat stores nothing


async def test_the_offset_is_applied_once_and_the_report_is_stored(
    olga, key, broker, postgres_server_url
) -> None:
    device = await fleet_device(olga, key)
    async with instance_database(postgres_server_url, olga) as conn:
        # As the configuration API sets it (ingest sees it within a few seconds).
        await conn.execute(
            "INSERT INTO device_config (device_id, desired, version, desired_at) "
            "VALUES ($1, '{\"temperature_offset\": -1.5}', 1, now())",
            device["id"],
        )
    topic = fleet.sensor_topic(device["uuid"], "bme688")
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    sent = iter(range(1000))

    async def publish_one() -> list[dict[str, str]]:
        at = start + timedelta(seconds=next(sent))
        await publish(broker, device, (topic, batch(message(at, temperature=25.0))))
        return await exported(olga, device["id"], start)

    # The offset reaches ingest within its refresh: from then on the platform applies it.
    rows = await eventually(
        publish_one,
        lambda rows: bool(rows) and rows[-1]["temperature_offset"] == "-1.5",
        what="a reading with the offset applied",
    )
    assert rows[-1]["temperature"] == "23.5"
    # The device says it applies the offset itself: its next readings get it no more.
    applied = b'{"version": 1, "temperature_offset": -1.5, "reporting_interval": 30}'
    after = start + timedelta(minutes=2)
    await publish(
        broker,
        device,
        (fleet.reported_topic(device["uuid"]), applied),
        (topic, batch(message(after, temperature=23.5))),
    )
    rows = await eventually(
        lambda: exported(olga, device["id"], start),
        lambda rows: rows[-1]["ts"] == after.isoformat(),
        what="the reading after the report",
    )
    assert (rows[-1]["temperature"], rows[-1]["temperature_offset"]) == ("23.5", "")
    async with instance_database(postgres_server_url, olga) as conn:
        config = await conn.fetchrow(
            "SELECT * FROM device_config WHERE device_id = $1", device["id"]
        )
    assert config["reported_version"] == 1 and config["reported_at"] is not None
    assert json.loads(config["reported"]) == {"temperature_offset": -1.5, "reporting_interval": 30}


async def test_a_bad_report_is_a_dead_letter(olga, key, broker) -> None:
    device = await fleet_device(olga, key)
    await publish(broker, device, (fleet.reported_topic(device["uuid"]), b'{"version": "x"}'))
    dead = await eventually(
        lambda: olga.api.get("/api/dead-letters"),
        lambda r: any(d["device_id"] == device["id"] for d in r.json()["dead_letters"]),
        what="the report refused",
    )
    (refused,) = [d for d in dead.json()["dead_letters"] if d["device_id"] == device["id"]]
    assert refused["reason"] == "report invalid: Expected `int`, got `str` - at `$.version`"


async def test_a_batch_published_twice_is_stored_once(
    olga, key, broker, postgres_server_url
) -> None:
    device = await fleet_device(olga, key)
    topic = fleet.sensor_topic(device["uuid"], "bme688")
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=3)
    again = batch(*(message(start + timedelta(seconds=i)) for i in range(10)))
    marker = batch(message(start + timedelta(seconds=30), temperature=30.0))
    await publish(broker, device, (topic, again), (topic, again), (topic, marker))
    await eventually(
        lambda: exported(olga, device["id"], start),
        lambda rows: bool(rows) and rows[-1]["temperature"] == "30",
        what="the marker stored",
    )
    async with instance_database(postgres_server_url, olga) as conn:
        assert await stored_of(conn, device["id"]) == {
            "rows": 11,
            "readings": 11,
            "rolled_up": 11,
        }


async def test_batches_in_flight_when_the_instance_is_killed_are_all_stored_once(
    client,  # noqa: F811
    broker,
    postgres_server_url,
) -> None:
    """As for the native format: a batch is acknowledged only once stored, so a kill -9 in the
    middle of a stream loses nothing and stores each reading once."""
    paula = await customer(client, "paula@example.com")
    try:
        key = str((await create_key(paula))["key"])
        device = await fleet_device(paula, key)
        topic = fleet.sensor_topic(device["uuid"], "bme688")
        pid = instances_running()[paula.id]
        start = (datetime.now(UTC) - timedelta(minutes=10)).replace(microsecond=0)
        batches, size = 60, 50
        async with fleet_mqtt_client(broker, device) as mqtt:
            for b in range(batches):
                at = [start + timedelta(milliseconds=10 * (b * size + i)) for i in range(size)]
                await mqtt.publish(topic, batch(*(message(t) for t in at)), qos=1)
                if b == batches // 3:
                    os.kill(pid, signal.SIGKILL)
        count = batches * size
        rows = await eventually(
            lambda: exported(paula, device["id"], start, restarting=True),
            lambda rows: len(rows) >= count,
            timeout=90,
            what="every reading stored after the restart",
        )
        assert len({r["ts"] for r in rows}) == len(rows) == count
        async with instance_database(postgres_server_url, paula) as conn:
            assert await stored_of(conn, device["id"]) == {
                "rows": count,
                "readings": count,
                "rolled_up": count,
            }
        assert instances_running()[paula.id] != pid
    finally:
        await paula.api.aclose()
