"""A fleet device's remote configuration: set in the API, it reaches the device as a retained
message with its version (also when the device subscribes later, and after the broker lost it
or was away when it was set); a later one replaces it; what the device reported shows beside
it. Bad bodies are refused field by field; a hand-registered device has none; another
customer's device is not there. Everything real: the control plane, the instance, Postgres,
NATS and a Mosquitto of this module's own (restarted here).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import httpx
import pytest
from fleet_steps import create_key, provision_fleet_device
from test_instance import (  # noqa: F401 - client is a fixture
    Customer,
    client,
    customer,
    instance_database,
    register,
)

from libs.servers.mosquitto import EmbeddedMosquitto
from services.instance.fleet import config_topic, reported_topic
from support import eventually

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def olga(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "olga@example.com")
    yield found
    await found.api.aclose()


@pytest.fixture(scope="module")
async def pete(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "pete@example.com")
    yield found
    await found.api.aclose()


_keys: dict[str, str] = {}


async def fleet_device(c: Customer, name: str) -> dict[str, Any]:
    """A device registered with a provisioning key and its key exchange done, as the original
    agent does it: its id, uuid and broker credentials."""
    if c.id not in _keys:
        _keys[c.id] = (await create_key(c))["key"]
    registered = await provision_fleet_device(str(c.api.base_url), _keys[c.id])
    mqtt = registered["mqtt"]
    assert mqtt["clientId"] == registered["uuid"]
    return {
        "device_id": registered["id"],
        "uuid": registered["uuid"],
        "username": mqtt["username"],
        "password": mqtt["password"],
    }


def as_device(broker: EmbeddedMosquitto, device: dict[str, Any]) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=device["username"],
        password=device["password"],
        identifier=device["uuid"],
    )


async def first_message(mqtt: aiomqtt.Client, seconds: float = 10) -> aiomqtt.Message:
    async with asyncio.timeout(seconds):
        async for message in mqtt.messages:
            return message
    raise AssertionError("no message")


async def config_message(broker: EmbeddedMosquitto, device: dict[str, Any]) -> aiomqtt.Message:
    """The first message a device that subscribes now gets on its config topic."""
    async with as_device(broker, device) as mqtt:
        await mqtt.subscribe(config_topic(device["uuid"]), qos=1)
        message = await first_message(mqtt, 3)
    assert message.topic.value == config_topic(device["uuid"])
    return message


async def retained_config(broker: EmbeddedMosquitto, device: dict[str, Any]) -> dict[str, Any]:
    """What a device that subscribes now gets on its config topic: the retained message."""
    message = await config_message(broker, device)
    assert message.retain, "the configuration is not retained"
    return dict(json.loads(bytes(message.payload)))


async def retained_or_none(
    broker: EmbeddedMosquitto, device: dict[str, Any]
) -> dict[str, Any] | None:
    """The retained configuration, or None while there is none (or the broker is away)."""
    with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
        message = await config_message(broker, device)
        if message.retain:
            return dict(json.loads(bytes(message.payload)))
    return None


def config_path(device: dict[str, Any]) -> str:
    return f"/api/devices/{device['device_id']}/config"


async def test_a_configuration_reaches_a_subscribed_device_retained_and_a_later_one_replaces_it(
    olga, broker
) -> None:
    device = await fleet_device(olga, "greenhouse")
    path = config_path(device)
    before = await olga.api.get(path)
    assert before.status_code == 200, before.text
    assert before.json() == {
        "device_id": device["device_id"],
        "uuid": device["uuid"],
        "desired": None,
        "version": 0,
        "desired_at": None,
        "published": False,
        "unpublished_reason": None,
        "reported": None,
        "reported_version": None,
        "reported_at": None,
        "in_sync": False,
    }
    wanted = {
        "reporting_interval": 30,
        "temperature_offset": -1.5,
        "heater_profile": "HP-354 fast",
        "custom": {"fan.speed": 3, "label": "north wall", "eco": True, "note": None},
    }
    # Subscribed before: the device gets it as it is published.
    async with as_device(broker, device) as mqtt:
        await mqtt.subscribe(config_topic(device["uuid"]), qos=1)
        first = await olga.api.put(path, json=wanted)
        assert first.status_code == 200, first.text
        live = json.loads(bytes((await first_message(mqtt)).payload))
    assert live == {"version": 1, **wanted}
    answer = first.json()
    assert answer["version"] == 1 and answer["published"] is True, answer["unpublished_reason"]
    assert answer["desired"] == wanted and answer["unpublished_reason"] is None
    assert answer["in_sync"] is False and answer["reported"] is None
    # Subscribed after: the broker kept it.
    assert await retained_config(broker, device) == {"version": 1, **wanted}

    second = await olga.api.put(path, json={"reporting_interval": 600})
    assert second.status_code == 200, second.text
    assert second.json()["version"] == 2 and second.json()["desired"] == {"reporting_interval": 600}
    wanted_now = {"version": 2, "reporting_interval": 600}
    retained = await eventually(
        lambda: retained_or_none(broker, device), lambda r: r == wanted_now, what="version 2"
    )
    assert retained == wanted_now
    shown = (await olga.api.get(path)).json()
    assert shown["version"] == 2 and shown["published"] is True
    assert datetime.fromisoformat(shown["desired_at"]) >= datetime.fromisoformat(
        answer["desired_at"]
    )


async def test_the_report_shows_with_its_time_and_whether_it_is_in_sync(olga, broker) -> None:
    device = await fleet_device(olga, "cellar")
    path = config_path(device)
    assert (await olga.api.put(path, json={"temperature_offset": 2})).status_code == 200
    assert (await olga.api.put(path, json={"temperature_offset": 2.5})).status_code == 200
    before = datetime.now(UTC)
    async with as_device(broker, device) as mqtt:
        await mqtt.publish(
            reported_topic(device["uuid"]),
            json.dumps({"version": 1, "temperature_offset": 2.0}).encode(),
            qos=1,
        )
    behind = (
        await eventually(
            lambda: olga.api.get(path),
            lambda r: r.json()["reported_version"] == 1,
            what="the report of version 1",
        )
    ).json()
    assert behind["reported"]["temperature_offset"] == 2.0
    assert behind["version"] == 2 and behind["in_sync"] is False
    assert datetime.fromisoformat(behind["reported_at"]) >= before.replace(microsecond=0)
    async with as_device(broker, device) as mqtt:
        await mqtt.publish(
            reported_topic(device["uuid"]),
            json.dumps({"version": 2, "temperature_offset": 2.5}).encode(),
            qos=1,
        )
    synced = await eventually(
        lambda: olga.api.get(path),
        lambda r: r.json()["in_sync"] is True,
        what="the report of the current version",
    )
    assert synced.json()["reported"]["temperature_offset"] == 2.5
    assert synced.json()["reported_at"] >= behind["reported_at"]


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"reporting_interval": 0}, "reporting_interval", "1 to 86400"),
        ({"reporting_interval": 86401}, "reporting_interval", "1 to 86400"),
        ({"reporting_interval": 2.5}, "reporting_interval", "whole number"),
        ({"reporting_interval": True}, "reporting_interval", "whole number"),
        ({"reporting_interval": "60"}, "reporting_interval", "whole number"),
        ({"temperature_offset": 20.01}, "temperature_offset", "-20 to 20"),
        ({"temperature_offset": "1"}, "temperature_offset", "number"),
        ({"heater_profile": ""}, "heater_profile", "1 to 64"),
        ({"heater_profile": "x" * 65}, "heater_profile", "1 to 64"),
        ({"heater_profile": "a/b"}, "heater_profile", "letters"),
        ({"custom": []}, "custom", "JSON object"),
        ({"custom": {f"k{i}": i for i in range(33)}}, "custom", "at most 32 keys"),
        ({"custom": {"bad key": 1}}, "custom.bad key", "a key must be"),
        ({"custom": {"k" * 65: 1}}, "custom." + "k" * 40, "a key must be"),
        ({"custom": {"k": "v" * 257}}, "custom.k", "at most 256 characters"),
        ({"custom": {"k": [1]}}, "custom.k", "a string, a number"),
        ({"custom": {"k": {"a": 1}}}, "custom.k", "a string, a number"),
        ({"custom": {"k": "a\x07b"}}, "custom.k", "control characters"),
        ({"interval": 5}, "interval", "not a known field"),
        ([1, 2], "body", "JSON object"),
    ],
)
async def test_a_bad_body_is_refused_naming_the_field(
    olga, broker, body: Any, field: str, reason: str
) -> None:
    device = await _one_fleet_device(olga)
    answer = await olga.api.put(config_path(device), json=body)
    assert answer.status_code == 400, answer.text
    fields = answer.json()["error"]["fields"]
    assert [f["field"] for f in fields] == [field], fields
    assert reason in fields[0]["reason"]
    assert (await olga.api.get(config_path(device))).json()["version"] == 0


async def test_every_bad_field_is_named_at_once_and_nothing_is_stored(olga, broker) -> None:
    device = await _one_fleet_device(olga)
    answer = await olga.api.put(
        config_path(device),
        json={"reporting_interval": -1, "temperature_offset": 99, "extra": 1, "custom": 5},
    )
    assert answer.status_code == 400
    named = {f["field"] for f in answer.json()["error"]["fields"]}
    assert named == {"reporting_interval", "temperature_offset", "extra", "custom"}
    not_json = await olga.api.put(
        config_path(device), content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert not_json.status_code == 400
    assert (await olga.api.get(config_path(device))).json()["version"] == 0


_fleet_devices: dict[str, dict[str, Any]] = {}


async def _one_fleet_device(c: Customer) -> dict[str, Any]:
    """One fleet device for the refusals (which change nothing), made at first use."""
    if c.id not in _fleet_devices:
        _fleet_devices[c.id] = await fleet_device(c, "untouched")
    return _fleet_devices[c.id]


async def test_a_hand_registered_device_has_no_remote_configuration(olga) -> None:
    device = await register(olga, "by hand")
    path = config_path(device)
    put = await olga.api.put(path, json={"reporting_interval": 60})
    assert put.status_code == 409, put.text
    assert "provisioning key" in put.json()["error"]["message"]
    assert (await olga.api.get(path)).status_code == 409


async def test_another_customers_device_is_not_there(olga, pete, broker):
    device = await fleet_device(olga, "private")
    path = config_path(device)
    assert (await olga.api.put(path, json={"heater_profile": "mine"})).status_code == 200
    # Pete's own instance has no such device...
    for answer in (
        await pete.api.get(path),
        await pete.api.put(path, json={"heater_profile": "theirs"}),
    ):
        assert answer.status_code == 404, answer.text
    # ...and Olga's instance does not take his session.
    petes_view = httpx.AsyncClient(base_url=str(olga.api.base_url), headers=pete.auth, timeout=10)
    async with petes_view:
        assert (await petes_view.get(path)).status_code == 404
        assert (await petes_view.put(path, json={"heater_profile": "x"})).status_code == 404
    assert (await olga.api.get(path)).json()["desired"] == {"heater_profile": "mine"}
    assert (await olga.api.get("/api/devices/no-such-device/config")).status_code == 404


async def test_a_configuration_set_while_the_broker_is_away_is_delivered_when_it_is_back(
    olga, broker
) -> None:
    device = await fleet_device(olga, "attic")
    path = config_path(device)
    assert (await olga.api.put(path, json={"reporting_interval": 10})).status_code == 200
    await asyncio.to_thread(broker.stop)
    try:
        away = await olga.api.put(path, json={"reporting_interval": 20})
        assert away.status_code == 200, away.text
        assert away.json()["version"] == 2 and away.json()["published"] is False
        assert "broker" in away.json()["unpublished_reason"]
        shown = (await olga.api.get(path)).json()
        assert shown["published"] is False and shown["unpublished_reason"]
    finally:
        await asyncio.to_thread(broker.start)
    await eventually(
        lambda: olga.api.get(path),
        lambda r: r.json()["published"] is True,
        timeout=60,
        what="the configuration published once the broker is back",
    )
    assert await retained_config(broker, device) == {"version": 2, "reporting_interval": 20}


async def test_a_broker_that_lost_its_retained_messages_gets_them_again(olga, broker) -> None:
    device = await fleet_device(olga, "basement")
    path = config_path(device)
    assert (await olga.api.put(path, json={"heater_profile": "slow"})).status_code == 200
    # Published after the answer: a subscriber quicker than it gets it live, not retained.
    first = await eventually(
        lambda: retained_or_none(broker, device), what="the configuration retained"
    )
    assert first == {"version": 1, "heater_profile": "slow"}
    # This module's broker keeps nothing across a restart (no persistence).
    await asyncio.to_thread(broker.stop)
    await asyncio.to_thread(broker.start)
    again = await eventually(
        lambda: retained_or_none(broker, device),
        timeout=60,
        interval=0.5,
        what="the retained configuration published again",
    )
    assert again == {"version": 1, "heater_profile": "slow"}
