"""Removing a customer on the local backend frees their fleet devices' uuids on the shared
broker: it must also take what those uuids hold retained (the desired configurations the
instance published, what the devices left), or whoever registers such a uuid next, another
account, is handed the removed customer's configuration and messages. Real Postgres, NATS,
Mosquitto and instance processes.
"""

from __future__ import annotations

import asyncio

import aiomqtt
import httpx
import pytest
from fleet_steps import fleet_mqtt_client, register_fleet_device
from test_local_backend import (  # noqa: F401 - control and platform are fixtures
    control,
    finished_job,
    platform,
    sign_up,
)

from libs.mqtt.dynsec import Acl, DynSec
from support import eventually

pytestmark = pytest.mark.slow


async def retained_under(broker, root: str) -> list[str]:
    """The topics under ``root`` with a retained message, as a client that may see them all
    finds them (up to a sentinel it publishes itself, not retained)."""
    async with DynSec(
        broker.host, broker.port, broker.admin_username, broker.admin_password
    ) as dynsec:
        await dynsec.ensure_role(
            "test-looker",
            [
                Acl(t, "#")
                for t in ("subscribePattern", "publishClientReceive", "publishClientSend")
            ],
        )
        await dynsec.ensure_client("test-looker", "looker", ["test-looker"], clientid="test-looker")
    got: list[str] = []
    sentinel = f"{root}/sentinel"
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username="test-looker",
        password="looker",
        identifier="test-looker",
    ) as mqtt:
        await mqtt.subscribe(f"{root}/#", qos=1)
        await mqtt.publish(sentinel, b"", qos=1)
        async with asyncio.timeout(10):
            async for message in mqtt.messages:
                if str(message.topic) == sentinel:
                    return got
                got.append(str(message.topic))
    return got


async def test_removing_a_customer_empties_what_their_uuids_hold_retained(
    client,
    admin,
    platform,  # noqa: F811
    broker,
) -> None:
    customer_id, auth = await sign_up(client, "leaving-fleet@example.com")
    me = await eventually(
        lambda: client.get("/api/customers/me", headers=auth),
        lambda r: r.json()["deployment"]["status"] == "ready",
        timeout=60,
        what="the instance deployed",
    )
    url = me.json()["deployment"]["instance_url"]
    async with httpx.AsyncClient(base_url=url, timeout=10, headers=auth) as instance:
        made = await instance.post("/api/provisioning-keys", json={"name": "fleet"})
        assert made.status_code == 201, made.text
        device = await register_fleet_device(url, made.json()["key"])
        root = f"iot/device/{device['uuid']}"
        configured = await instance.put(
            f"/api/devices/{device['id']}/config", json={"reporting_interval": 5}
        )
        assert configured.status_code == 200, configured.text
        assert configured.json()["published"] is True
    async with fleet_mqtt_client(broker, device) as mqtt:
        await mqtt.publish(f"{root}/sensor/bme688", b'{"note": "left"}', qos=1, retain=True)
    assert sorted(await retained_under(broker, root)) == [f"{root}/config", f"{root}/sensor/bme688"]

    removal = await client.delete(f"/api/customers/{customer_id}/deployment", headers=admin)
    assert removal.status_code == 202, removal.text
    done = await finished_job(client, admin, customer_id, "delete-customer-stack")
    assert done["state"] == "completed"
    assert await retained_under(broker, root) == []
