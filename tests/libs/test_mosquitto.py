"""Tenant isolation and admin behaviour of the embedded Mosquitto, beyond test_mqtt_broker.py.

The broker and its admin client live in ``libs.servers.mosquitto`` and ``libs.mqtt.dynsec``; these
tests pin down what a customer's broker role must guarantee: the receive ACL as well as the
subscribe ACL, the WebSockets listener, concurrent admin commands, and errors that arrive in bounded
time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from libs.mqtt.dynsec import Acl, DynSec, DynSecError
from libs.servers.mosquitto import MAX_CONNECTIONS, EmbeddedMosquitto

SENTINEL = b"sentinel"


def customer_acls(root: str) -> list[Acl]:
    return [
        Acl("publishClientSend", f"{root}/#"),
        Acl("publishClientReceive", f"{root}/#"),
        Acl("subscribePattern", f"{root}/#"),
    ]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedMosquitto]:
    server = EmbeddedMosquitto(tmp_path_factory.mktemp("mosquitto"), websockets=True)
    server.start()
    yield server
    server.stop()


def admin(broker: EmbeddedMosquitto, timeout: float = 5.0) -> DynSec:
    return DynSec(
        broker.host, broker.port, broker.admin_username, broker.admin_password, timeout=timeout
    )


def as_user(broker: EmbeddedMosquitto, user: str, password: str) -> aiomqtt.Client:
    return aiomqtt.Client(broker.host, broker.port, username=user, password=password)


async def as_operator(broker: EmbeddedMosquitto) -> aiomqtt.Client:
    """A client that may publish into every customer's topics.

    Not the dynamic-security admin: the role ``mosquitto_ctrl dynsec init`` gives it may publish
    only on ``$CONTROL/dynamic-security/#``, and the broker silently drops anything else it sends.
    """
    async with admin(broker) as dynsec:
        await dynsec.ensure_role("operator", [Acl("publishClientSend", "customers/#")])
        await dynsec.ensure_client("operator", "operator-pw", ["operator"])
    return as_user(broker, "operator", "operator-pw")


async def may_subscribe(mqtt: aiomqtt.Client, topic: str) -> bool:
    """Whether the broker grants the subscription (it answers a refused one, never raises)."""
    [code] = await mqtt.subscribe(topic, qos=1)
    return not code.is_failure if isinstance(code, ReasonCode) else code < 0x80


async def payloads_until_sentinel(mqtt: aiomqtt.Client, within: float = 5.0) -> list[bytes]:
    """Messages up to the sentinel, published after everything under test has been acknowledged.

    The broker queues a message for its subscribers before acknowledging it, so anything it was
    going to deliver has arrived once the sentinel has: no fixed wait for "never arrives".
    """
    got: list[bytes] = []
    async with asyncio.timeout(within):
        async for message in mqtt.messages:
            payload = bytes(message.payload)
            if payload == SENTINEL:
                return got
            got.append(payload)
    return got


async def test_the_admin_can_connect_and_anonymous_clients_cannot(
    broker: EmbeddedMosquitto,
) -> None:
    async with as_user(broker, broker.admin_username, broker.admin_password) as mqtt:
        assert await may_subscribe(mqtt, "$CONTROL/dynamic-security/v1/response")
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(broker.host, broker.port):
            pass


async def test_a_customer_cannot_subscribe_beyond_its_topics(broker: EmbeddedMosquitto) -> None:
    async with admin(broker) as dynsec:
        for name in ("A", "B"):
            await dynsec.ensure_role(f"iso-{name}", customer_acls(f"customers/{name}"))
            await dynsec.ensure_client(f"iso-{name}", f"pw-{name}", [f"iso-{name}"])
    async with (
        as_user(broker, "iso-A", "pw-A") as a,
        as_user(broker, "iso-B", "pw-B") as b,
        await as_operator(broker) as operator,
    ):
        assert not await may_subscribe(a, "customers/#")
        assert await may_subscribe(a, "customers/A/#")
        await b.subscribe("customers/B/#", qos=1)
        await operator.publish("customers/B/x", b"for B", qos=1)
        await a.publish("customers/A/x", b"A's own", qos=1)
        await operator.publish("customers/A/end", SENTINEL, qos=1)
        await operator.publish("customers/B/end", SENTINEL, qos=1)
        assert await payloads_until_sentinel(a) == [b"A's own"]
        assert await payloads_until_sentinel(b) == [b"for B"]


async def test_an_allow_receive_acl_alone_does_not_isolate(broker: EmbeddedMosquitto) -> None:
    # Dynamic security's default for publishClientReceive is allow, so an *allow* receive ACL on
    # the customer's own topics restricts nothing: isolation rests on subscribePattern alone.
    # Pinned here so that a change in that default (or in our roles) is noticed.
    too_broad = [Acl("subscribePattern", "customers/#"), *customer_acls("customers/A")]
    assert await messages_seen_by_a(broker, "broad-A", too_broad) == [b"for B", b"for A"]


async def test_a_deny_receive_acl_keeps_other_customers_messages_out(
    broker: EmbeddedMosquitto,
) -> None:
    # Defence in depth: a lower-priority deny makes the receive ACL hold even when the
    # subscribe ACL is too broad.
    guarded = [
        Acl("subscribePattern", "customers/#"),
        Acl("publishClientReceive", "customers/#", allow=False, priority=-1),
        *customer_acls("customers/A"),
    ]
    assert await messages_seen_by_a(broker, "guarded-A", guarded) == [b"for A"]


async def messages_seen_by_a(broker: EmbeddedMosquitto, name: str, acls: list[Acl]) -> list[bytes]:
    """What a client with ``acls``, subscribed to ``customers/#``, gets of A's and B's traffic."""
    async with admin(broker) as dynsec:
        await dynsec.ensure_role(name, acls)
        await dynsec.ensure_client(name, "pw", [name])
    async with as_user(broker, name, "pw") as a, await as_operator(broker) as operator:
        assert await may_subscribe(a, "customers/#")
        await operator.publish("customers/B/x", b"for B", qos=1)
        await operator.publish("customers/A/x", b"for A", qos=1)
        await operator.publish("customers/A/end", SENTINEL, qos=1)
        return await payloads_until_sentinel(a)


async def test_a_shared_subscription_does_not_bypass_the_subscribe_acl(
    broker: EmbeddedMosquitto,
) -> None:
    async with admin(broker) as dynsec:
        await dynsec.ensure_role("share-A", customer_acls("customers/A"))
        await dynsec.ensure_client("share-A", "pw", ["share-A"])
    async with as_user(broker, "share-A", "pw") as a:
        assert not await may_subscribe(a, "$share/g/customers/#")
        assert not await may_subscribe(a, "customers/+/x")


async def test_ensure_role_converges_to_the_new_acls(broker: EmbeddedMosquitto) -> None:
    async with admin(broker) as dynsec:
        await dynsec.ensure_role("moving", customer_acls("customers/old"))
        await dynsec.ensure_role("moving", customer_acls("customers/new"))
        await dynsec.ensure_client("moving", "pw", ["moving"])
        role = await dynsec.command("getRole", rolename="moving")
    topics = {acl["topic"] for acl in role["data"]["role"]["acls"]}
    assert topics == {"customers/new/#"}
    async with as_user(broker, "moving", "pw") as mqtt:
        assert not await may_subscribe(mqtt, "customers/old/#")
        assert await may_subscribe(mqtt, "customers/new/#")


async def test_ensure_client_converges_its_roles(broker: EmbeddedMosquitto) -> None:
    async with admin(broker) as dynsec:
        for name in ("r1", "r2", "r3"):
            await dynsec.ensure_role(name, customer_acls(f"customers/{name}"))
        await dynsec.ensure_client("roles", "pw", ["r1", "r2"])
        await dynsec.ensure_client("roles", "pw2", ["r2", "r3"])
        record = await dynsec.get_client("roles")
    assert record is not None
    assert sorted(r["rolename"] for r in record["roles"]) == ["r2", "r3"]


async def test_concurrent_commands_each_get_their_own_answer(broker: EmbeddedMosquitto) -> None:
    names = [f"many-{i}" for i in range(20)]
    async with admin(broker) as dynsec:
        await asyncio.gather(*(dynsec.ensure_client(n, "pw", []) for n in names))
        records = await asyncio.gather(*(dynsec.get_client(n) for n in names))
    assert [r["username"] if r else None for r in records] == names


async def test_customers_connect_over_websockets(broker: EmbeddedMosquitto) -> None:
    async with admin(broker) as dynsec:
        await dynsec.ensure_role("ws-A", customer_acls("customers/wsA"))
        await dynsec.ensure_client("ws-A", "pw", ["ws-A"])
    ws = aiomqtt.Client(
        broker.host, broker.ws_port, username="ws-A", password="pw", transport="websockets"
    )
    async with ws:
        await ws.subscribe("customers/wsA/#", qos=1)
        await ws.publish("customers/wsA/x", b"over ws", qos=1)
        await ws.publish("customers/wsA/end", SENTINEL, qos=1)
        assert await payloads_until_sentinel(ws) == [b"over ws"]
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(broker.host, broker.ws_port, transport="websockets"):
            pass


async def test_a_wrong_admin_password_is_refused_not_waited_on(broker: EmbeddedMosquitto) -> None:
    with pytest.raises(DynSecError, match="admin"):
        async with DynSec(broker.host, broker.port, broker.admin_username, "wrong", timeout=5.0):
            pass


async def test_a_client_without_admin_rights_gets_a_timeout_not_a_hang(
    broker: EmbeddedMosquitto,
) -> None:
    async with admin(broker) as dynsec:
        await dynsec.ensure_client("not-admin", "pw", [])
    with pytest.raises(DynSecError, match="did not answer"):
        async with DynSec(broker.host, broker.port, "not-admin", "pw", timeout=0.5) as dynsec:
            await dynsec.list_clients()


async def test_a_dead_broker_is_a_clear_error(tmp_path: Path) -> None:
    server = EmbeddedMosquitto(tmp_path / "m")
    server.start()
    server.stop()
    with pytest.raises(DynSecError, match="cannot connect"):
        async with DynSec(server.host, server.port, server.admin_username, "pw", timeout=2.0):
            pass


async def test_passwords_are_not_logged(
    broker: EmbeddedMosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with admin(broker) as dynsec:
        await dynsec.ensure_client("logged", "s3cret-Unlogged", [])
        await dynsec.ensure_client("logged", "s3cret-Also-Unlogged", [])
    assert "s3cret" not in caplog.text
    assert broker.admin_password not in caplog.text
    assert broker.admin_password not in broker.log_path.read_text()


def test_the_data_folder_keeps_secrets_private(broker: EmbeddedMosquitto) -> None:
    for name in ("admin-password", "dynamic-security.json"):
        assert (broker.data_dir / name).stat().st_mode & 0o077 == 0, name


def test_the_embedded_broker_listens_on_loopback_only_and_bounds_connections(
    tmp_path: Path,
) -> None:
    """Mosquitto 2.0 binds a WebSockets listener to every interface whatever its host (seen
    by an attacker from the machine's network address): the embedded broker has none unless
    asked, and each listener refuses connections beyond its bound."""
    import socket

    server = EmbeddedMosquitto(tmp_path / "plain")
    server.start()
    try:
        config = (server.data_dir / "mosquitto.conf").read_text()
        assert "protocol websockets" not in config
        assert f"max_connections {MAX_CONNECTIONS}" in config
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("10.255.255.255", 1))  # picks a route; sends nothing
            outside = probe.getsockname()[0]
        for port in (server.port, server.ws_port):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((outside, port), timeout=2).close()
        socket.create_connection((server.host, server.port), timeout=2).close()
    finally:
        server.stop()
