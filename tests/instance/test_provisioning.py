"""Fleet provisioning as a customer and their devices use it: provisioning keys made, listed and
revoked; devices registering themselves with a key (fifty at once, within the license's
maxDevices), with broker credentials of their own bound to their uuid; keys that expired, were
revoked or are used up; a lost answer registered again; the key exchange; deleting a fleet
device. Everything real: the control plane, the instance, Postgres, NATS and Mosquitto.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import pytest
from fleet_steps import (
    create_key,
    exchange_key,
    fleet_mqtt_client,
    new_api_key,
    new_uuid,
    post_registration,
    provision_fleet_device,
    register_fleet_device,
    registration_body,
    upgrade_to_professional,
)
from test_instance import (  # noqa: F401 - client is a fixture
    Customer,
    client,
    customer,
    instance_database,
    received_within,
)

from libs.mqtt.dynsec import DynSec
from libs.servers.mosquitto import EmbeddedMosquitto
from services.instance import fleet
from services.provisioner.backends.local.processes import instances_running
from support import eventually

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def fiona(client, store) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "fiona@example.com")
    await upgrade_to_professional(store, found)
    yield found
    await found.api.aclose()


def url(c: Customer) -> str:
    return str(c.api.base_url)


async def keys_of(c: Customer) -> dict[str, dict[str, Any]]:
    listed = await c.api.get("/api/provisioning-keys")
    assert listed.status_code == 200, listed.text
    return {k["key_id"]: k for k in listed.json()["keys"]}


async def device_of(c: Customer, device_id: str) -> dict[str, Any]:
    answer = await c.api.get(f"/api/devices/{device_id}")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


async def echoes(broker: EmbeddedMosquitto, device: dict[str, Any]) -> bool:
    """The device connects, subscribes to its own sensor topic and gets back what it
    publishes there."""
    topic = f"iot/device/{device['uuid']}/sensor/echo"
    async with fleet_mqtt_client(broker, device) as mqtt:
        await mqtt.subscribe(topic, qos=1)
        await mqtt.publish(topic, b'{"heartbeat": true}', qos=1)
        async with asyncio.timeout(10):
            async for message in mqtt.messages:
                return str(message.topic) == topic
    return False


async def refused(broker: EmbeddedMosquitto, device: dict[str, Any], **mqtt: str) -> bool:
    """Whether the broker refuses the device's credentials (changed by ``mqtt``)."""
    changed = {**device, "mqtt": {**device["mqtt"], **mqtt}}
    try:
        async with fleet_mqtt_client(broker, changed):
            return False
    except aiomqtt.MqttError:
        return True


async def test_fifty_devices_register_at_once_and_the_fifty_first_is_refused(fiona, broker) -> None:
    key = await create_key(fiona, name="factory line 1")
    assert re.fullmatch(r"iotpk_[A-Za-z0-9_-]{43}", key["key"])
    devices = await asyncio.gather(
        *(register_fleet_device(url(fiona), key["key"]) for _ in range(50))
    )
    assert len({d["id"] for d in devices}) == 50
    assert len({d["mqtt"]["password"] for d in devices}) == 50
    assert {d["mqtt"]["username"] for d in devices} == {f"iot-{d['uuid']}" for d in devices}
    first = devices[0]
    root = f"iot/device/{first['uuid']}/#"
    assert first["mqtt"]["clientId"] == first["uuid"]
    assert first["mqtt"]["topics"] == {"publish": root, "subscribe": root}
    assert first["mqtt"]["brokers"] == [f"mqtt://{broker.host}:{broker.port}"]
    assert first["mqtt"]["broker"] == first["mqtt"]["brokers"][0]
    assert first["deviceName"].startswith("sensor ") and first["deviceType"] == "bme688"

    fifty_first = await post_registration(
        url(fiona), key["key"], registration_body(new_uuid(), new_api_key())
    )
    assert fifty_first.status_code == 403, fifty_first.text
    assert "maxDevices" in fifty_first.json()["error"]["message"]

    for device in devices[:5]:
        assert await echoes(broker, device)
    # Credentials work under their own client id only.
    assert await refused(broker, devices[0], clientId=devices[1]["uuid"])
    assert await refused(broker, devices[0], clientId="anything-else-0")

    listed = (await keys_of(fiona))[key["key_id"]]
    assert listed["uses"] == 50 and listed["devices"] == 50 and listed["state"] == "active"
    assert "key" not in listed
    shown = await device_of(fiona, first["id"])
    assert shown["uuid"] == first["uuid"] and shown["device_type"] == "bme688"
    assert shown["provisioning"] == "pending"
    assert shown["provisioning_key_id"] == key["key_id"]
    assert "password" not in str(shown) and "api_key" not in str(shown)

    # Room for the tests below: deleting a fleet device revokes it on the broker.
    gone = devices[5:]
    for device in gone:
        deleted = await fiona.api.delete(f"/api/devices/{device['id']}")
        assert deleted.status_code == 204, deleted.text
    assert await refused(broker, gone[0])
    assert (await keys_of(fiona))[key["key_id"]]["devices"] == 5
    async with DynSec(
        broker.host, broker.port, broker.admin_username, broker.admin_password
    ) as dynsec:
        assert await dynsec.get_client(f"iot-{gone[0]['uuid']}") is None
        roles = (await dynsec.command("listRoles", verbose=True))["data"]["roles"]
        topics = {acl["topic"] for role in roles for acl in role.get("acls", [])}
    assert f"iot/device/{gone[0]['uuid']}/#" not in topics
    assert f"iot/device/{first['uuid']}/#" in topics
    # A deleted device's uuid is free again.
    back = await register_fleet_device(url(fiona), key["key"], gone[0]["uuid"])
    assert back["id"] != gone[0]["id"]
    assert await echoes(broker, back)


async def test_a_key_is_shown_once_and_bad_keys_are_refused_with_the_field(fiona) -> None:
    later = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    key = await create_key(fiona, name="pilot", expires_at=later, max_uses=3)
    assert key["state"] == "active" and key["uses"] == 0 and key["max_uses"] == 3
    assert key["note"] and key["revoked_at"] is None
    listed = await keys_of(fiona)
    assert "key" not in listed[key["key_id"]]
    assert key["key"] not in str(listed)
    newest = (await fiona.api.get("/api/provisioning-keys")).json()["keys"][0]
    assert newest["key_id"] == key["key_id"]

    for body, field in [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "k", "expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
        ({"name": "k", "expires_at": "2040-01-01T00:00:00"}, "expires_at"),
        ({"name": "k", "expires_at": "soon"}, "expires_at"),
        ({"name": "k", "max_uses": 0}, "max_uses"),
        ({"name": "k", "max_uses": 100_001}, "max_uses"),
        ({"name": "k", "max_uses": "3"}, "max_uses"),
        ({"name": "k", "colour": "red"}, "colour"),
    ]:
        answer = await fiona.api.post("/api/provisioning-keys", json=body)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"]["fields"][0]["field"] == field, body
    not_object = await fiona.api.post("/api/provisioning-keys", json=[1])
    assert not_object.status_code == 400
    assert (await fiona.api.delete("/api/provisioning-keys/pk_nothing")).status_code == 404
    bad_limit = await fiona.api.get("/api/provisioning-keys/audit", params={"limit": "0"})
    assert bad_limit.status_code == 400
    assert bad_limit.json()["error"]["fields"][0]["field"] == "limit"


async def test_a_revoked_key_registers_nothing_and_its_devices_go_on(fiona, broker) -> None:
    key = await create_key(fiona, name="to revoke")
    device = await provision_fleet_device(url(fiona), key["key"])
    assert (await fiona.api.delete(f"/api/provisioning-keys/{key['key_id']}")).status_code == 204
    assert (await fiona.api.delete(f"/api/provisioning-keys/{key['key_id']}")).status_code == 204
    late = await post_registration(
        url(fiona), key["key"], registration_body(new_uuid(), new_api_key())
    )
    assert late.status_code == 403, late.text
    assert "revoked" in late.json()["error"]["message"]
    listed = (await keys_of(fiona))[key["key_id"]]
    assert listed["state"] == "revoked" and listed["revoked_at"] and listed["devices"] == 1
    assert await echoes(broker, device)


async def test_expired_and_used_up_keys_register_nothing(fiona, postgres_server_url) -> None:
    expiring = await create_key(fiona, name="expiring")
    async with instance_database(postgres_server_url, fiona) as conn:
        # The key's time passes.
        await conn.execute(
            "UPDATE provisioning_keys SET expires_at = now() - interval '1 second' "
            "WHERE key_id = $1",
            expiring["key_id"],
        )
    expired = await post_registration(
        url(fiona), expiring["key"], registration_body(new_uuid(), new_api_key())
    )
    assert expired.status_code == 403 and "expired" in expired.json()["error"]["message"]
    assert (await keys_of(fiona))[expiring["key_id"]]["state"] == "expired"

    once = await create_key(fiona, name="once", max_uses=1)
    device = await register_fleet_device(url(fiona), once["key"])
    used_up = await post_registration(
        url(fiona), once["key"], registration_body(new_uuid(), new_api_key())
    )
    assert used_up.status_code == 403 and "used up" in used_up.json()["error"]["message"]
    # The first answer was lost: the same device asks again, and that is no second use.
    again = await register_fleet_device(
        url(fiona), once["key"], device["uuid"], device["deviceApiKey"]
    )
    assert again["id"] == device["id"]
    listed = (await keys_of(fiona))[once["key_id"]]
    assert listed["uses"] == 1 and listed["state"] == "used up"


async def test_registering_again_and_the_key_exchange(fiona, broker) -> None:
    key = await create_key(fiona, name="repeats")
    device = await register_fleet_device(url(fiona), key["key"])
    again = await register_fleet_device(
        url(fiona), key["key"], device["uuid"], device["deviceApiKey"]
    )
    assert again["id"] == device["id"]
    assert again["mqtt"]["password"] != device["mqtt"]["password"]
    assert await refused(broker, device)
    assert await echoes(broker, again)
    other = await post_registration(
        url(fiona), key["key"], registration_body(device["uuid"], new_api_key())
    )
    assert other.status_code == 409 and "another deviceApiKey" in other.text
    assert (await keys_of(fiona))[key["key_id"]]["uses"] == 1

    wrong = await exchange_key(url(fiona), device["uuid"], new_api_key())
    unknown = await exchange_key(url(fiona), new_uuid(), device["deviceApiKey"])
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json()["error"]["message"] == unknown.json()["error"]["message"]
    assert (await device_of(fiona, device["id"]))["provisioning"] == "pending"
    right = await exchange_key(url(fiona), device["uuid"], device["deviceApiKey"])
    assert right.status_code == 200, right.text
    body = right.json()
    assert body["id"] == device["id"] and body["uuid"] == device["uuid"]
    assert body["status"] == "provisioned" and body["key_exchanged_at"]
    repeated = await exchange_key(url(fiona), device["uuid"], device["deviceApiKey"])
    assert repeated.status_code == 200 and repeated.json() == body
    assert (await device_of(fiona, device["id"]))["provisioning"] == "provisioned"

    provisioned = await post_registration(
        url(fiona), key["key"], registration_body(device["uuid"], device["deviceApiKey"])
    )
    assert provisioned.status_code == 409 and "already provisioned" in provisioned.text
    assert await echoes(broker, again)


async def test_the_audit_trail_names_every_attempt_by_key_id(fiona) -> None:
    key = await create_key(fiona, name="audited")
    device = await register_fleet_device(url(fiona), key["key"])
    await exchange_key(url(fiona), device["uuid"], "a wrong device api key")
    await fiona.api.delete(f"/api/provisioning-keys/{key['key_id']}")
    await post_registration(url(fiona), key["key"], registration_body(new_uuid(), new_api_key()))
    audit = await fiona.api.get("/api/provisioning-keys/audit", params={"limit": "3"})
    assert audit.status_code == 200, audit.text
    entries = audit.json()["entries"]
    assert [(e["action"], e["outcome"]) for e in entries] == [
        ("register", "refused"),
        ("key-exchange", "refused"),
        ("register", "accepted"),
    ]
    assert entries[0]["key_id"] == key["key_id"] and "revoked" in entries[0]["reason"]
    assert entries[1]["uuid"] == device["uuid"] and entries[1]["key_id"] == key["key_id"]
    assert entries[2]["uuid"] == device["uuid"] and entries[2]["reason"] is None
    assert all(e["address"] == "127.0.0.1" for e in entries)
    assert key["key"] not in audit.text


async def fleet_role_of(dynsec: DynSec, uuid: str) -> dict[str, Any]:
    """The fleet role that may receive the device's topics."""
    roles = (await dynsec.command("listRoles", verbose=True))["data"]["roles"]
    return next(
        r
        for r in roles
        if r["rolename"].endswith("-fleet")
        and any(a["topic"] == f"iot/device/{uuid}/#" for a in r.get("acls", []))
    )


async def test_a_restarted_instance_converges_its_fleet_and_forgets_the_abandoned(
    fiona, broker, postgres_server_url
) -> None:
    key = await create_key(fiona, name="converged")
    device = await provision_fleet_device(url(fiona), key["key"])
    lost = await provision_fleet_device(url(fiona), key["key"])
    abandoned = await register_fleet_device(url(fiona), key["key"])
    async with instance_database(postgres_server_url, fiona) as conn:
        # Registered a day ago, and its key exchange never came.
        await conn.execute(
            "UPDATE devices SET created_at = now() - interval '25 hours' WHERE device_id = $1",
            abandoned["id"],
        )
        uuids = {
            r["uuid"]
            for r in await conn.fetch(
                "SELECT uuid FROM devices WHERE deleted_at IS NULL AND uuid IS NOT NULL"
            )
        }
        # What housekeeping forgets at start: an audit row past the professional plan's
        # retention (365 days) and a failure window that ended.
        await conn.execute(
            "INSERT INTO registration_audit (at, action, outcome, address) "
            "VALUES (now() - interval '400 days', 'register', 'refused', '192.0.2.1')"
        )
        await conn.execute(
            "INSERT INTO registration_failures VALUES ('addr:192.0.2.1', "
            "now() - interval '1 hour', 20)"
        )
    stray = new_uuid()
    async with DynSec(
        broker.host, broker.port, broker.admin_username, broker.admin_password
    ) as dynsec:
        role = (await fleet_role_of(dynsec, device["uuid"]))["rolename"]
        # The broker drifted: a device's rights gone from the fleet role, a stranger's added,
        # and the device's client unbound from its uuid.
        await dynsec.remove_role_acls(role, fleet.reader_acls(device["uuid"]))
        await dynsec.add_role_acls(role, fleet.reader_acls(stray))
        await dynsec.command("setClientId", username=f"iot-{device['uuid']}")
        # A device whose client is gone (a deletion that failed half-way): its uuid is free on
        # the shared broker, so the fleet role must not receive it any more.
        await dynsec.delete_client(f"iot-{lost['uuid']}")
        # A registration that reached the broker and not the database (killed between the
        # two), whose device never came back: its client would hold the uuid for ever.
        orphan = new_uuid()
        await dynsec.ensure_role(f"iot-{orphan}", fleet.device_acls(orphan))
        await dynsec.ensure_client(
            f"iot-{orphan}",
            "orphaned password",
            [f"iot-{orphan}"],
            textname=fleet.owner_text(fiona.id),
            clientid=orphan,
        )
    pid = instances_running()[fiona.id]
    os.kill(pid, signal.SIGKILL)

    async def fleet_role() -> set[tuple[str, str]]:
        async with DynSec(
            broker.host, broker.port, broker.admin_username, broker.admin_password
        ) as dynsec:
            got = (await dynsec.command("getRole", rolename=role))["data"]["role"]
            client = await dynsec.get_client(f"iot-{device['uuid']}")
        bound = client is not None and client.get("clientid") == device["uuid"]
        return {(a["acltype"], a["topic"]) for a in got["acls"]} if bound else set()

    kept = sorted(uuids - {lost["uuid"], abandoned["uuid"]})
    wanted = {(a.acltype, a.topic) for a in fleet.fleet_role_acls(kept)}
    await eventually(
        fleet_role,
        lambda acls: acls == wanted,
        timeout=90,
        what="the fleet role and the device's binding converged after the restart",
    )
    assert instances_running()[fiona.id] != pid
    assert await echoes(broker, device)
    async with DynSec(
        broker.host, broker.port, broker.admin_username, broker.admin_password
    ) as dynsec:
        assert await dynsec.get_client(f"iot-{orphan}") is None
        assert f"iot-{device['uuid']}" in await dynsec.clients_named(fleet.owner_text(fiona.id))

    async def forgotten() -> bool:
        async with instance_database(postgres_server_url, fiona) as conn:
            old = await conn.fetchval(
                "SELECT count(*) FROM registration_audit WHERE address = '192.0.2.1'"
            )
            ended = await conn.fetchval(
                "SELECT count(*) FROM registration_failures WHERE subject = 'addr:192.0.2.1'"
            )
        return old == 0 and ended == 0

    await eventually(forgotten, timeout=30, what="old attempts forgotten by housekeeping")
    assert (await fiona.api.get(f"/api/devices/{abandoned['id']}")).status_code == 404
    assert await refused(broker, abandoned)
