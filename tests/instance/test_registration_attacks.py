"""Fleet provisioning against devices and customers that try what they should not: a fleet
device publishing or subscribing outside its own topics, another customer using a key or taking
a uuid that is not theirs (on the shared broker), bad and huge bodies, missing and unknown keys,
and an address that keeps failing. Everything real: the control plane, the instances, Postgres,
NATS and Mosquitto.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiomqtt
import httpx
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
)
from test_instance import (  # noqa: F401 - client is a fixture
    Customer,
    client,
    customer,
    received_within,
    register,
)

from libs.mqtt.dynsec import Acl, DynSec
from libs.servers.mosquitto import EmbeddedMosquitto

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def gina(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "gina@example.com")
    yield found
    await found.api.aclose()


@pytest.fixture(scope="module")
async def hank(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "hank@example.com")
    yield found
    await found.api.aclose()


@pytest.fixture(scope="module")
async def ivy(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "ivy@example.com")
    yield found
    await found.api.aclose()


def url(c: Customer) -> str:
    return str(c.api.base_url)


def admin(broker: EmbeddedMosquitto) -> DynSec:
    return DynSec(broker.host, broker.port, broker.admin_username, broker.admin_password)


@contextlib.asynccontextmanager
async def observer(broker: EmbeddedMosquitto) -> AsyncIterator[aiomqtt.Client]:
    """A client that may receive everything on the broker, subscribed to ``#``."""
    async with admin(broker) as dynsec:
        await dynsec.ensure_role(
            "test-observer",
            [Acl("subscribePattern", "#"), Acl("publishClientReceive", "#")],
        )
        await dynsec.ensure_client(
            "test-observer", "observer password", ["test-observer"], clientid="test-observer"
        )
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username="test-observer",
        password="observer password",
        identifier="test-observer",
    ) as mqtt:
        await mqtt.subscribe("#", qos=1)
        yield mqtt


async def topics_until(mqtt: aiomqtt.Client, sentinel: str) -> list[str]:
    """Topics received up to and including ``sentinel``'s (published last, so what was
    published before it and delivered has arrived by then)."""
    got: list[str] = []
    async with asyncio.timeout(10):
        async for message in mqtt.messages:
            got.append(str(message.topic))
            if str(message.topic) == sentinel:
                return got
    return got


async def test_a_fleet_device_is_confined_to_its_own_topics(gina, broker) -> None:
    key = await create_key(gina)
    a = await provision_fleet_device(url(gina), key["key"])
    b = await provision_fleet_device(url(gina), key["key"])
    native = await register(gina, "native one")
    a_root, b_root = f"iot/device/{a['uuid']}", f"iot/device/{b['uuid']}"
    sentinel = f"{a_root}/sensor/last"
    async with observer(broker) as watching, fleet_mqtt_client(broker, a) as mqtt:
        await mqtt.publish(f"{b_root}/sensor/bme688", b'{"messages": []}', qos=1)
        await mqtt.publish(native["mqtt"]["topics"]["readings"], b'{"temperature": 1}', qos=1)
        await mqtt.publish(native["mqtt"]["topics"]["status"], b"offline", qos=1)
        await mqtt.publish(f"{a_root}/config", b'{"version": 99}', qos=1, retain=True)
        await mqtt.publish(f"{gina.id}/devices/x/readings", b"{}", qos=1)
        await mqtt.publish(sentinel, b"{}", qos=1)
        assert await topics_until(watching, sentinel) == [sentinel]

    async with fleet_mqtt_client(broker, a) as spy, fleet_mqtt_client(broker, b) as other:
        await spy.subscribe("#", qos=1)
        await spy.subscribe(f"{b_root}/#", qos=1)
        await spy.subscribe(f"{gina.id}/#", qos=1)
        await spy.subscribe(f"{a_root}/#", qos=1)
        await other.publish(f"{b_root}/sensor/bme688", b'{"messages": []}', qos=1)
        await spy.publish(sentinel, b"{}", qos=1)
        # Its own sentinel is all it gets (it may receive under its own root).
        assert await topics_until(spy, sentinel) == [sentinel]
    # Nothing retained on its config topic from the device's attempt.
    async with fleet_mqtt_client(broker, a) as mqtt:
        await mqtt.subscribe(f"{a_root}/config", qos=1)
        assert await received_within(mqtt, 1.0) == []


async def test_another_customer_can_use_nothing_of_this_one(gina, hank, broker) -> None:
    key = await create_key(gina, name="gina's line")
    device = await provision_fleet_device(url(gina), key["key"])

    # Gina's key means nothing to Hank's instance.
    foreign_key = await post_registration(
        url(hank), key["key"], registration_body(new_uuid(), new_api_key())
    )
    assert foreign_key.status_code == 401, foreign_key.text
    # A uuid Gina holds is hers on the shared broker, pending or provisioned.
    hanks_key = await create_key(hank, name="hank's line")
    pending = await register_fleet_device(url(gina), key["key"])
    for held in (device, pending):
        taken = await post_registration(
            url(hank), hanks_key["key"], registration_body(held["uuid"], held["deviceApiKey"])
        )
        assert taken.status_code == 409, taken.text
        assert taken.json()["error"]["message"] == "this uuid is registered elsewhere"
    assert (await exchange_key(url(hank), device["uuid"], device["deviceApiKey"])).status_code == (
        401
    )
    async with fleet_mqtt_client(broker, device):
        pass  # its credentials are untouched

    # Hank's session sees nothing of Gina's instance; his own lists hold nothing of hers.
    async with httpx.AsyncClient(base_url=url(gina), headers=hank.auth, timeout=10) as as_hank:
        for path in ("/api/provisioning-keys", "/api/provisioning-keys/audit"):
            assert (await as_hank.get(path)).status_code == 404
        assert (await as_hank.delete(f"/api/provisioning-keys/{key['key_id']}")).status_code == 404
        assert (await as_hank.post("/api/provisioning-keys", json={"name": "x"})).status_code == (
            404
        )
    async with httpx.AsyncClient(base_url=url(gina), timeout=10) as anonymous:
        assert (await anonymous.get("/api/provisioning-keys")).status_code == 401
    hanks = (await hank.api.get("/api/provisioning-keys")).text
    hanks_devices = (await hank.api.get("/api/devices")).text
    for text in (hanks, hanks_devices):
        assert key["key_id"] not in text and device["uuid"] not in text
    # His audit holds his own attempts only: Gina's uuids he tried, never her key's id.
    hanks_audit = (await hank.api.get("/api/provisioning-keys/audit")).json()["entries"]
    assert {e["key_id"] for e in hanks_audit} <= {hanks_key["key_id"], None}
    assert [e["reason"] for e in hanks_audit if e["uuid"] == device["uuid"]] == [
        "unknown device or wrong deviceApiKey",
        "this uuid is registered elsewhere",
    ]
    assert (await hank.api.delete(f"/api/provisioning-keys/{key['key_id']}")).status_code == 404
    assert (await gina.api.get("/api/provisioning-keys")).json()["keys"][0]["state"] == "active"

    # Only Gina's fleet role (and the device's own) may receive the device's topics.
    async with admin(broker) as dynsec:
        roles = (await dynsec.command("listRoles", verbose=True))["data"]["roles"]
    holders = {
        r["rolename"]
        for r in roles
        if any(acl["topic"] == f"iot/device/{device['uuid']}/#" for acl in r.get("acls", []))
    }
    assert len(holders) == 2 and f"iot-{device['uuid']}" in holders
    assert [h for h in holders if h.endswith("-fleet")], holders


async def test_a_broker_client_left_behind_is_adopted_only_by_its_owner(gina, broker) -> None:
    key = await create_key(gina, name="adoption")
    ours, theirs = new_uuid(), new_uuid()
    # Another customer's whose instance is not running here: a running one would remove the
    # client at its start as an orphan of its own (and a test racing that start saw a 200).
    other = new_uuid()
    async with admin(broker) as dynsec:
        # Left by a crash between the broker and the commit: the text name says whose it is.
        await dynsec.ensure_client(f"iot-{ours}", "left behind", [], textname=f"customer:{gina.id}")
        await dynsec.ensure_client(f"iot-{theirs}", "left behind", [], textname=f"customer:{other}")
    adopted = await register_fleet_device(url(gina), key["key"], ours)
    assert adopted["uuid"] == ours
    refused = await post_registration(
        url(gina), key["key"], registration_body(theirs, new_api_key())
    )
    assert refused.status_code == 409, refused.text


async def test_bad_bodies_and_missing_keys_are_refused_and_named(gina) -> None:
    key = await create_key(gina, name="strict")
    good = registration_body(new_uuid(), new_api_key())
    for body, field in [
        ([good], "body"),
        ({**good, "uuid": None}, "uuid"),
        ({**good, "uuid": "short"}, "uuid"),
        ({**good, "uuid": "abcdefgh/+/#"}, "uuid"),
        ({**good, "uuid": "x" * 65}, "uuid"),
        # The client ids of devices registered by hand and of instances are not for taking.
        ({**good, "uuid": "0123456789abcdef"}, "uuid"),
        ({**good, "uuid": "instance-0123456789abcdef"}, "uuid"),
        ({**good, "deviceApiKey": "too short"}, "deviceApiKey"),
        ({**good, "deviceApiKey": "é" * 20}, "deviceApiKey"),
        ({**good, "deviceName": "n" * 101}, "deviceName"),
        ({**good, "deviceType": 7}, "deviceType"),
    ]:
        answer = await post_registration(url(gina), key["key"], body)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"]["fields"][0]["field"] == field, body
    async with httpx.AsyncClient(base_url=url(gina), timeout=10) as http:
        headers = {"Authorization": f"Bearer {key['key']}"}
        not_json = await http.post("/api/v1/device/register", content=b"{nope", headers=headers)
        assert not_json.status_code == 400 and "Traceback" not in not_json.text
        huge = await http.post(
            "/api/v1/device/register",
            content=b'{"uuid": "' + b"x" * 200_000 + b'"}',
            headers={**headers, "Content-Type": "application/json"},
        )
        assert huge.status_code == 413, huge.text
        huge_exchange = await http.post(
            f"/api/v1/device/{new_uuid()}/key-exchange", content=b"x" * 200_000
        )
        assert huge_exchange.status_code == 413, huge_exchange.text
    missing = await post_registration(url(gina), None, good)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    unknown = await post_registration(url(gina), "iotpk_" + "A" * 43, good)
    assert unknown.status_code == 401
    assert (await post_registration(url(gina), "garbage", good)).status_code == 401


async def test_an_address_that_keeps_failing_is_answered_429(ivy) -> None:
    key = await create_key(ivy, name="rate limited")
    device = await register_fleet_device(url(ivy), key["key"])
    answers: list[int] = []
    for i in range(20):
        # What a client writes in X-Forwarded-For is not read (no proxy is trusted here).
        forwarded = {"X-Forwarded-For": f"198.51.100.{i}"}
        async with httpx.AsyncClient(base_url=url(ivy), timeout=10, headers=forwarded) as http:
            answer = await http.post(
                f"/api/v1/device/{device['uuid']}/key-exchange",
                json={"deviceApiKey": f"wrong key number {i:04d}"},
            )
        answers.append(answer.status_code)
    assert answers == [401] * 20
    limited = await exchange_key(url(ivy), device["uuid"], device["deviceApiKey"])
    assert limited.status_code == 429, limited.text
    assert 0 < int(limited.headers["Retry-After"]) <= 600
    registering = await post_registration(
        url(ivy), key["key"], registration_body(new_uuid(), new_api_key())
    )
    assert registering.status_code == 429
    audit = (await ivy.api.get("/api/provisioning-keys/audit")).json()["entries"]
    refused = [e for e in audit if e["outcome"] == "refused"]
    assert len(refused) == 20
    assert all(e["address"] == "127.0.0.1" and e["uuid"] == device["uuid"] for e in refused)
    assert all(e["key_id"] == key["key_id"] for e in refused)
    listed = (await ivy.api.get(f"/api/devices/{device['id']}")).json()
    assert listed["provisioning"] == "pending"
