"""Fleet devices on the shared broker against crashes and a uuid that changed hands: whatever
one customer's instance still believes about a uuid, it never touches the broker client of
another customer who holds that uuid now. Everything real: the control plane, the instances,
Postgres, NATS and Mosquitto.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fleet_steps import (
    create_key,
    fleet_mqtt_client,
    new_uuid,
    provision_fleet_device,
    register_fleet_device,
)
from test_instance import (  # noqa: F401 - client is a fixture
    Customer,
    client,
    customer,
)

from libs.mqtt.dynsec import DynSec
from libs.servers.mosquitto import EmbeddedMosquitto
from services.instance import fleet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def alma(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "alma@example.com")
    yield found
    await found.api.aclose()


@pytest.fixture(scope="module")
async def boris(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "boris@example.com")
    yield found
    await found.api.aclose()


def url(c: Customer) -> str:
    return str(c.api.base_url)


def admin(broker: EmbeddedMosquitto) -> DynSec:
    return DynSec(broker.host, broker.port, broker.admin_username, broker.admin_password)


async def fleet_roles_holding(dynsec: DynSec, uuid: str) -> list[str]:
    roles = (await dynsec.command("listRoles", verbose=True))["data"]["roles"]
    return [
        r["rolename"]
        for r in roles
        if r["rolename"].endswith("-fleet")
        and any(a["topic"] == f"{fleet.device_root(uuid)}/#" for a in r.get("acls", []))
    ]


async def test_deleting_a_device_whose_uuid_another_customer_took_leaves_theirs_alone(
    alma, boris, broker
) -> None:
    almas = await provision_fleet_device(url(alma), (await create_key(alma))["key"])
    uuid = almas["uuid"]
    username = fleet.broker_username(uuid)
    # Alma's earlier removal of the device got as far as the broker and no further (the
    # instance was killed before its commit): the uuid is free on the broker, her row stays.
    async with admin(broker) as dynsec:
        for role in await fleet_roles_holding(dynsec, uuid):
            await dynsec.remove_role_acls(role, fleet.reader_acls(uuid))
        await dynsec.delete_client(username)
        await dynsec.delete_role(username)
    # Boris's device of that uuid registers: it is his now.
    boriss = await register_fleet_device(url(boris), (await create_key(boris))["key"], uuid)

    # Alma deletes her device again: her row goes, Boris's client stays as it is.
    deleted = await alma.api.delete(f"/api/devices/{almas['id']}")
    assert deleted.status_code == 204, deleted.text
    assert almas["id"] not in (await alma.api.get("/api/devices")).text
    async with admin(broker) as dynsec:
        held = await dynsec.get_client(username)
        assert held is not None and held["textname"] == f"customer:{boris.id}"
        assert len(await fleet_roles_holding(dynsec, uuid)) == 1
    async with fleet_mqtt_client(broker, boriss):
        pass  # his credentials still connect


async def retained_under(broker: EmbeddedMosquitto, device: dict, sentinel: str) -> list[str]:
    """The topics ``device`` receives on subscribing to its own root, up to the sentinel it
    then publishes (not retained): the retained messages the broker holds there."""
    got: list[str] = []
    async with fleet_mqtt_client(broker, device) as mqtt:
        await mqtt.subscribe(f"{fleet.device_root(device['uuid'])}/#", qos=1)
        await mqtt.publish(sentinel, b"{}", qos=1)
        async with asyncio.timeout(10):
            async for message in mqtt.messages:
                if str(message.topic) == sentinel:
                    return got
                got.append(str(message.topic))
    return got


async def test_what_a_deleted_device_left_retained_is_not_handed_to_the_next_holder(
    alma, boris, broker
) -> None:
    almas = await provision_fleet_device(url(alma), (await create_key(alma))["key"])
    uuid = almas["uuid"]
    # Alma's device leaves retained messages under its own topics (the broker lets it).
    left = [
        fleet.sensor_topic(uuid, "bme688"),
        fleet.reported_topic(uuid),
        f"{fleet.device_root(uuid)}/commands/run",
    ]
    async with fleet_mqtt_client(broker, almas) as mqtt:
        for topic in left:
            await mqtt.publish(topic, b'{"temperature": 99}', qos=1, retain=True)
    held = await retained_under(broker, almas, fleet.sensor_topic(uuid, "s1"))
    assert sorted(held) == sorted(left)
    deleted = await alma.api.delete(f"/api/devices/{almas['id']}")
    assert deleted.status_code == 204, deleted.text

    # Boris's device of that uuid subscribes to its topics: nothing of Alma's is there.
    boriss = await register_fleet_device(url(boris), (await create_key(boris))["key"], uuid)
    assert await retained_under(broker, boriss, fleet.sensor_topic(uuid, "s2")) == []


async def test_uuids_differing_in_case_are_two_devices_of_their_own(alma, boris, broker) -> None:
    uuid = new_uuid()
    upper = await register_fleet_device(url(alma), (await create_key(alma))["key"], uuid.upper())
    lower = await register_fleet_device(url(boris), (await create_key(boris))["key"], uuid)
    async with admin(broker) as dynsec:
        for device, owner in ((upper, alma), (lower, boris)):
            held = await dynsec.get_client(device["mqtt"]["username"])
            assert held is not None and held["textname"] == f"customer:{owner.id}"
            assert held["clientid"] == device["uuid"]
    # Neither receives what the other publishes (the broker's topics are case-sensitive too).
    async with fleet_mqtt_client(broker, upper) as alma_device:
        await alma_device.subscribe(f"{fleet.device_root(upper['uuid'])}/#", qos=1)
        async with fleet_mqtt_client(broker, lower) as boris_device:
            await boris_device.publish(fleet.sensor_topic(uuid, "bme688"), b"{}", qos=1)
        sentinel = fleet.sensor_topic(upper["uuid"], "sentinel")
        await alma_device.publish(sentinel, b"{}", qos=1)
        async with asyncio.timeout(10):
            async for message in alma_device.messages:
                assert str(message.topic) == sentinel
                break
