"""Devices on the shared broker, attacked by another tenant's device: each broker client is
bound to its client id, devices receive nothing, and oversized messages are refused.

Issue 11: a device of customer A connected with the client id ``instance-<B's customer id>``
and ``clean_start=false``, resumed B's ingest session (its subscriptions), received B's
readings and kicked B's ingest off every time it connected. Everything here is real: the
control plane with the local backend, Mosquitto with dynamic security, the instance processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import httpx
import pytest
from tenant_instances import (
    Tenant,
    device_client,
    reading,
    register,
    sign_up,
    stored_times,
)

from libs.mqtt.dynsec import Acl, DynSec
from libs.servers.mosquitto import EmbeddedMosquitto
from services.provisioner.backends.base import derive_password
from services.provisioner.backends.local.processes import instances_running
from support import eventually

pytestmark = pytest.mark.slow

READINGS = 25


@pytest.fixture(scope="module")
async def alice(client: httpx.AsyncClient) -> AsyncIterator[Tenant]:
    tenant = await sign_up(client, "alice@example.com")
    yield tenant
    await tenant.api.aclose()


@pytest.fixture(scope="module")
async def bob(client: httpx.AsyncClient) -> AsyncIterator[Tenant]:
    tenant = await sign_up(client, "bob@example.com")
    yield tenant
    await tenant.api.aclose()


def admin(broker: EmbeddedMosquitto) -> DynSec:
    return DynSec(broker.host, broker.port, broker.admin_username, broker.admin_password)


async def attempt(
    broker: EmbeddedMosquitto, device: dict[str, Any], client_id: str, clean_start: bool
) -> tuple[bool, int]:
    """Connect with the device's credentials under ``client_id``; whether the broker let it
    in, and how many messages it received in half a second there."""
    try:
        async with device_client(broker, device, client_id, clean_start) as mqtt:
            got = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    async for _ in mqtt.messages:
                        got += 1
            return True, got
    except aiomqtt.MqttError:
        return False, 0


async def received_within(mqtt: aiomqtt.Client, seconds: float) -> list[str]:
    got: list[str] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for message in mqtt.messages:
                got.append(str(message.topic))
    return got


@pytest.mark.parametrize("clean_start", [False, True])
async def test_a_device_cannot_take_over_another_customers_ingest(
    alice, bob, broker, clean_start
) -> None:
    attacker = await register(alice, f"attacker {clean_start}")
    victim = await register(bob, f"victim {clean_start}")
    # The id the instance used to connect with (predictable from the public customer id),
    # and the one it is bound to now (which a tenant cannot know, but try it anyway).
    bound = f"instance-{derive_password(b'p' * 40, 'mqtt-client-id', bob.id)[:32]}"
    targets = [f"instance-{bob.id}", bound]
    start = (datetime.now(UTC) - timedelta(minutes=5)).replace(microsecond=0)
    let_in, stolen = [], 0
    async with device_client(broker, victim) as mqtt:
        for index in range(READINGS):
            ts = (start + timedelta(seconds=index)).isoformat()
            await mqtt.publish(victim["mqtt"]["topics"]["readings"], reading(ts=ts), qos=1)
            for target in targets:
                connected, got = await attempt(broker, attacker, target, clean_start)
                if connected:
                    let_in.append(target)
                stolen += got
    assert let_in == [], f"the broker let the attacker in as {sorted(set(let_in))}"
    assert stolen == 0
    times = await eventually(
        lambda: stored_times(bob, victim["device_id"], start),
        lambda found: len(found) >= READINGS,
        timeout=30,
        what="every reading of the victim stored",
    )
    assert len(times) == READINGS


async def test_a_device_connects_only_with_its_own_client_id(alice, bob, broker) -> None:
    first = await register(alice, "first")
    second = await register(alice, "second")
    bobs = await register(bob, "bob's own")
    for other in (second["device_id"], bobs["device_id"], "any-other-id", f"instance-{alice.id}"):
        connected, _ = await attempt(broker, first, other, clean_start=True)
        assert not connected, f"the device connected as {other}"
    connected, _ = await attempt(broker, first, first["device_id"], clean_start=True)
    assert connected
    # The registration tells the device the id it must use.
    assert first["mqtt"]["client_id"] == first["device_id"]


async def test_a_device_can_neither_subscribe_nor_receive(alice, bob, broker) -> None:
    listener = await register(alice, "listener")
    talker = await register(alice, "talker")
    filters = ["#", f"{alice.id}/#", f"{bob.id}/#", listener["mqtt"]["topics"]["readings"]]
    async with device_client(broker, listener) as mqtt:
        for topic_filter in [*filters, f"$share/g/{alice.id}/#"]:
            granted = await mqtt.subscribe(topic_filter, qos=1)
            assert all(code.value >= 0x80 for code in granted), topic_filter
    # Receiving is denied too, not only subscribing: let a subscription slip through (a role
    # checked before the device's own, as a mistaken grant would be) and nothing arrives.
    username = listener["mqtt"]["username"]
    async with admin(broker) as dynsec:
        await dynsec.ensure_role("slipped", [Acl("subscribePattern", f"{alice.id}/#")])
        await dynsec.command("addClientRole", username=username, rolename="slipped", priority=9)
    try:
        async with device_client(broker, listener) as mqtt:
            granted = await mqtt.subscribe(f"{alice.id}/#", qos=1)
            assert all(code.value < 0x80 for code in granted)
            async with device_client(broker, talker) as other:
                for _ in range(3):
                    await other.publish(talker["mqtt"]["topics"]["readings"], reading(), qos=1)
            assert await received_within(mqtt, 1.0) == []
    finally:
        async with admin(broker) as dynsec:
            await dynsec.command("removeClientRole", username=username, rolename="slipped")
            await dynsec.delete_role("slipped")


async def test_devices_registered_before_are_bound_when_the_instance_starts(alice, broker) -> None:
    device = await register(alice, "registered long ago")
    username, device_id = device["mqtt"]["username"], device["device_id"]
    topics = list(device["mqtt"]["topics"].values())
    async with admin(broker) as dynsec:
        # The shape a device had before: any client id, and publish ACLs only.
        await dynsec.command("setClientId", username=username)
        await dynsec.ensure_role(username, [Acl("publishClientSend", t) for t in topics])
        assert "clientid" not in (await dynsec.get_client(username) or {})
    os.kill(instances_running()[alice.id], signal.SIGKILL)  # the supervisor starts it again

    async def shape() -> tuple[str | None, list[tuple[str, str, bool]]]:
        async with admin(broker) as dynsec:
            client = await dynsec.get_client(username) or {}
            role = await dynsec.command("getRole", rolename=username)
        acls = role["data"]["role"]["acls"]
        return client.get("clientid"), sorted((a["acltype"], a["topic"], a["allow"]) for a in acls)

    bound, acls = await eventually(
        shape, lambda s: s[0] is not None, timeout=60, what="the device bound at start"
    )
    assert bound == device_id
    assert ("publishClientReceive", "#", False) in acls
    assert ("subscribePattern", "#", False) in acls
    assert {(kind, topic) for kind, topic, allow in acls if allow} == {
        ("publishClientSend", t) for t in topics
    }
    connected, _ = await attempt(broker, device, "its-old-random-id", clean_start=True)
    assert not connected


def _string(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("!H", len(raw)) + raw


def _length(value: int) -> bytes:
    """MQTT's variable-length integer."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _connect_311(username: str, password: str, client_id: str) -> bytes:
    flags = 0xC2  # user name, password, clean session
    body = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", 30) + _string(client_id)
    body += _string(username) + _string(password)
    return b"\x10" + _length(len(body)) + body


async def test_an_oversized_publish_is_refused_and_the_broker_stays_up(alice, broker) -> None:
    device = await register(alice, "oversized")
    mqtt = device["mqtt"]
    topic = mqtt["topics"]["readings"]
    reader, writer = await asyncio.open_connection(broker.host, broker.port)
    writer.write(_connect_311(mqtt["username"], mqtt["password"], device["device_id"]))
    await writer.drain()
    assert (await reader.readexactly(4))[3] == 0  # CONNACK: accepted
    size = 100 * 1024 * 1024
    head = _string(topic) + struct.pack("!H", 1)
    writer.write(b"\x32" + _length(len(head) + size) + head)  # PUBLISH, QoS 1
    sent, answer = 0, b""
    chunk = b"x" * (1 << 20)
    try:
        while sent < size:
            writer.write(chunk)
            sent += len(chunk)
            await asyncio.wait_for(writer.drain(), 10)
        answer = await asyncio.wait_for(reader.read(4), 10)
    except (ConnectionError, TimeoutError):
        pass
    finally:
        writer.close()
    assert answer[:1] != b"\x40", "the broker acknowledged a 100 MB message (PUBACK)"
    assert sent < size, "the broker read the whole 100 MB"
    # An MQTT 5 client over the limit is refused too (64 KiB is the broker's limit).
    with pytest.raises(aiomqtt.MqttError):
        async with device_client(broker, device) as client:
            await client.publish(topic, b"{" + b" " * 100_000 + b"}", qos=1, timeout=5)
    assert broker.is_running
    since = datetime.now(UTC) - timedelta(minutes=1)
    async with device_client(broker, device) as client:
        await client.publish(topic, reading(temperature=19.5), qos=1)
    await eventually(
        lambda: stored_times(alice, device["device_id"], since),
        lambda found: len(found) == 1,
        what="a normal reading after the oversized ones",
    )
    dead = (await alice.api.get("/api/dead-letters")).json()["dead_letters"]
    assert [d for d in dead if d["device_id"] == device["device_id"]] == []
