"""The instance's database connection is lost just as a registration commits (as a kill -9 of
the instance, or Postgres restarting, after the broker made the device's client and before the
commit): the broker keeps a client of the uuid with our text name and the fleet role's rights
on it, the database nothing, and the device never got its answer. The device registers again:
the orphan is adopted (not refused as "registered elsewhere"), the device connects with the
new password, the key counts one use, and ingest stores what it publishes.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from fleet_fault_steps import KEY, running_instance
from fleet_steps import (
    fleet_mqtt_client,
    new_api_key,
    new_uuid,
    post_registration,
    registration_body,
)
from tcp_relay import TcpRelay

from libs.servers.mosquitto import EmbeddedMosquitto
from services.instance import fleet
from support import eventually

pytestmark = pytest.mark.slow


async def test_a_registration_cut_at_its_commit_is_adopted_by_the_next(
    postgres_server_url: str, broker: EmbeddedMosquitto
) -> None:
    # The instance reaches Postgres through the relay (its database is made on the server
    # itself; only the port differs).
    relay = TcpRelay(postgres_server_url)
    async with (
        relay,
        running_instance(postgres_server_url, broker, database_port=relay.port) as inst,
    ):
        uuid, api_key = new_uuid(), new_api_key()
        body = registration_body(uuid, api_key)
        # Armed by the relay itself on the registration's connection, so neither a busy
        # machine nor another pooled connection's COMMIT can take the cut's place.
        relay.cut_client_at(b"COMMIT", after=b"UPDATE provisioning_keys SET uses")
        lost = await post_registration(inst.url, KEY, body)
        assert relay.cut.is_set(), (lost.status_code, lost.text)
        assert lost.status_code >= 500, lost.text
        assert "password" not in lost.text

        assert await inst.db.fetchval("SELECT count(*) FROM devices") == 0
        assert await inst.db.fetchval("SELECT uses FROM provisioning_keys") == 0
        async with inst.state.devices.broker_admin() as dynsec:
            orphan = await dynsec.get_client(fleet.broker_username(uuid))
        assert orphan is not None
        assert orphan["textname"] == fleet.owner_text(inst.settings.instance_customer_id)

        again = await eventually(
            lambda: post_registration(inst.url, KEY, body),
            lambda r: r.status_code != 503,
            what="the registration once the database answers again",
        )
        assert again.status_code == 200, again.text
        device = again.json()
        assert await inst.db.fetchval("SELECT uses FROM provisioning_keys") == 1
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        reading = {
            "temperature": 21.5,
            "humidity": 45.0,
            "pressure": 101325.0,
            "gas_resistance": 125000.0,
            "timestamp": now,
        }
        async with fleet_mqtt_client(broker, device) as mqtt:
            await mqtt.publish(
                fleet.sensor_topic(uuid, "bme688"),
                json.dumps({"sensor": "bme688", "timestamp": now, "messages": [reading]}),
                qos=1,
            )
        await eventually(
            lambda: inst.db.fetchval(
                "SELECT count(*) FROM readings WHERE device_id = $1", device["id"]
            ),
            lambda n: n == 1,
            what="the adopted device's reading stored",
        )
