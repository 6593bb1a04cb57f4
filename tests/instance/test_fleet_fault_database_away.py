"""Postgres goes away (every connection cut, new ones refused: a restart) while a fleet device
publishes readings batches in the original format and other devices register.

While it is away: readiness says the database is away, registrations are answered 503 and
keep nothing. Once it is back: every reading of every QoS 1 batch is stored once (nothing was
acknowledged before its batch committed), and the registrations refused meanwhile succeed.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest
from fleet_fault_steps import KEY, MONITORING, running_instance
from fleet_steps import (
    fleet_mqtt_client,
    new_api_key,
    new_uuid,
    post_registration,
    register_fleet_device,
    registration_body,
)
from tcp_relay import TcpRelay

from libs.servers.mosquitto import EmbeddedMosquitto
from services.instance import fleet
from support import eventually

pytestmark = pytest.mark.slow

BATCHES = 30
PER_BATCH = 5


def original_batch(first: datetime) -> str:
    messages = []
    for i in range(PER_BATCH):
        stamp = (first + timedelta(seconds=i)).isoformat().replace("+00:00", "Z")
        messages.append(
            {
                "temperature": 21.5,
                "humidity": 45.0,
                "pressure": 101325.0,
                "gas_resistance": 125000.0,
                "timestamp": stamp,
            }
        )
    return json.dumps(
        {"sensor": "bme688", "timestamp": messages[0]["timestamp"], "messages": messages}
    )


async def test_a_database_restart_loses_no_reading_of_a_batch_and_no_registration(
    postgres_server_url: str, broker: EmbeddedMosquitto
) -> None:
    relay = TcpRelay(postgres_server_url)
    async with (
        relay,
        running_instance(postgres_server_url, broker, database_port=relay.port) as inst,
    ):
        device = await register_fleet_device(inst.url, KEY)
        topic = fleet.sensor_topic(device["uuid"], "bme688")
        start = datetime.now(UTC) - timedelta(hours=2)
        body = registration_body(new_uuid(), new_api_key())

        async with fleet_mqtt_client(broker, device) as mqtt:
            for n in range(BATCHES):
                if n == BATCHES // 3:
                    relay.go_down()
                    away = await eventually(
                        lambda: inst.http.get("/health/ready", headers=MONITORING),
                        lambda r: r.status_code == 503,
                        what="readiness saying the database is away",
                    )
                    assert away.json()["database"]["ok"] is False
                    refused = await post_registration(inst.url, KEY, body)
                    assert refused.status_code == 503, refused.text
                if n == 2 * BATCHES // 3:
                    relay.come_back()
                first = start + timedelta(seconds=n * PER_BATCH)
                await mqtt.publish(topic, original_batch(first), qos=1)
                await asyncio.sleep(0.05)

        await eventually(
            lambda: inst.db.fetchval(
                "SELECT count(*) FROM readings WHERE device_id = $1", device["id"]
            ),
            lambda n: n == BATCHES * PER_BATCH,
            timeout=60,
            what="every reading of every batch stored once",
        )
        assert await inst.db.fetchval("SELECT count(*) FROM dead_letters") == 0
        assert await inst.db.fetchval("SELECT count(*) FROM devices") == 1
        again = await post_registration(inst.url, KEY, body)
        assert again.status_code == 200, again.text
        await eventually(
            lambda: inst.http.get("/health/ready", headers=MONITORING),
            lambda r: r.status_code == 200,
            what="ready again",
        )
