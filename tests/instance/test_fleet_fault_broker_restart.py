"""The broker goes away and comes back (a restart: without persistence it has lost its
retained messages and sessions; its clients and roles are in its dynamic-security file).

While it is away: readiness says the broker is away, a registration is answered 502 and keeps
nothing, a configuration set is stored (not published, and the answer says so). Once it is
back: readiness recovers, every configuration is retained again at its latest version, the
fleet devices connect with the credentials they had and their readings are stored, and the
refused registration succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime
from typing import Any

import aiomqtt
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

from libs.servers.mosquitto import EmbeddedMosquitto
from services.instance import fleet
from services.instance.device_config import DesiredConfig, set_desired
from support import eventually

pytestmark = pytest.mark.slow


async def retained_config(broker: EmbeddedMosquitto, device: dict[str, Any]) -> Any:
    """The retained configuration the device gets when it subscribes, or None."""
    async with fleet_mqtt_client(broker, device) as mqtt:
        await mqtt.subscribe(fleet.config_topic(device["uuid"]), qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                async for message in mqtt.messages:
                    if message.retain and message.payload:
                        return json.loads(bytes(message.payload))
    return None


def original_batch(at: datetime) -> str:
    stamp = at.isoformat().replace("+00:00", "Z")
    reading = {
        "temperature": 21.5,
        "humidity": 45.0,
        "pressure": 101325.0,
        "gas_resistance": 125000.0,
        "timestamp": stamp,
    }
    return json.dumps({"sensor": "bme688", "timestamp": stamp, "messages": [reading]})


async def test_a_broker_restart_loses_no_configuration_and_no_device(
    postgres_server_url: str, broker: EmbeddedMosquitto
) -> None:
    async with running_instance(postgres_server_url, broker) as inst:
        devices = [await register_fleet_device(inst.url, KEY) for _ in range(2)]
        publisher = inst.state.config_publisher

        async def configure(device: dict[str, Any], interval: int) -> str | None:
            async with inst.state.pool().acquire() as conn:
                await set_desired(conn, device["id"], DesiredConfig(reporting_interval=interval))
            return await publisher.publish(device["id"])

        assert await configure(devices[0], 30) is None
        assert await configure(devices[1], 40) is None

        broker.stop()
        try:
            away = await eventually(
                lambda: inst.http.get("/health/ready", headers=MONITORING),
                lambda r: r.status_code == 503,
                what="readiness saying the broker is away",
            )
            assert away.json()["broker"]["ok"] is False
            refused = await post_registration(
                inst.url, KEY, body := registration_body(new_uuid(), new_api_key())
            )
            assert refused.status_code == 502, refused.text
            reason = await configure(devices[0], 60)
            assert reason is not None and "broker" in reason
        finally:
            broker.start()

        await eventually(
            lambda: inst.http.get("/health/ready", headers=MONITORING),
            lambda r: r.status_code == 200,
            timeout=60,
            what="ready again",
        )
        await eventually(
            lambda: retained_config(broker, devices[0]),
            lambda config: config == {"version": 2, "reporting_interval": 60},
            timeout=60,
            what="the configuration set while the broker was away, retained",
        )
        # The publisher sends everything again one after another: the other one follows.
        await eventually(
            lambda: retained_config(broker, devices[1]),
            lambda config: config == {"version": 1, "reporting_interval": 40},
            timeout=60,
            what="the other configuration, retained again",
        )
        assert await inst.db.fetchval(
            "SELECT bool_and(published_version = version) FROM device_config"
        )

        async with fleet_mqtt_client(broker, devices[1]) as mqtt:
            await mqtt.publish(
                fleet.sensor_topic(devices[1]["uuid"], "bme688"),
                original_batch(datetime.now(UTC)),
                qos=1,
            )
        await eventually(
            lambda: inst.db.fetchval(
                "SELECT count(*) FROM readings WHERE device_id = $1", devices[1]["id"]
            ),
            lambda n: n == 1,
            what="a reading published after the restart stored",
        )
        assert (await post_registration(inst.url, KEY, body)).status_code == 200
        assert await inst.db.fetchval("SELECT count(*) FROM devices") == 3
        with pytest.raises(aiomqtt.MqttError):
            # The broker keeps refusing what it refused before: a stranger's password.
            async with aiomqtt.Client(
                broker.host, broker.port, username=devices[0]["mqtt"]["username"], password="x"
            ):
                pass
