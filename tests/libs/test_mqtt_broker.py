"""The embedded Mosquitto and its dynamic-security administration, on a real broker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt
import pytest

from libs.mqtt.dynsec import Acl, DynSec, DynSecError, device_acls
from libs.servers.mosquitto import EmbeddedMosquitto


def acls(root: str) -> list[Acl]:
    return [
        Acl("publishClientSend", f"{root}/#"),
        Acl("publishClientReceive", f"{root}/#"),
        Acl("subscribePattern", f"{root}/#"),
    ]


def admin(broker: EmbeddedMosquitto, password: str | None = None) -> DynSec:
    return DynSec(
        broker.host, broker.port, broker.admin_username, password or broker.admin_password
    )


def client(broker: EmbeddedMosquitto, user: str, password: str) -> aiomqtt.Client:
    return aiomqtt.Client(broker.host, broker.port, username=user, password=password)


async def received(mqtt: aiomqtt.Client, within: float) -> list[bytes]:
    got: list[bytes] = []
    try:
        async with asyncio.timeout(within):
            async for message in mqtt.messages:
                got.append(bytes(message.payload))  # type: ignore[arg-type]
    except TimeoutError:
        pass
    return got


async def test_anonymous_clients_are_refused(broker) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(broker.host, broker.port):
            pass


async def test_a_customer_sees_only_its_own_topics(broker) -> None:
    async with admin(broker) as dynsec:
        for name in ("a", "b"):
            await dynsec.ensure_role(f"role-{name}", acls(f"customers/{name}"))
            await dynsec.ensure_client(f"user-{name}", f"pw-{name}", [f"role-{name}"])
    async with client(broker, "user-a", "pw-a") as a, client(broker, "user-b", "pw-b") as b:
        await a.subscribe("customers/a/#")
        await b.subscribe("customers/b/#")
        # A publishes into B's space: the broker drops it; B publishes into its own.
        await a.publish("customers/b/x", b"from a", qos=1)
        await b.publish("customers/b/x", b"from b", qos=1)
        await a.publish("customers/a/x", b"own", qos=1)
        assert await received(b, 1.0) == [b"from b"]
        assert await received(a, 0.5) == [b"own"]


async def test_ensure_is_idempotent_and_changes_the_password(broker) -> None:
    async with admin(broker) as dynsec:
        await dynsec.ensure_role("role-c", acls("customers/c"))
        await dynsec.ensure_role("role-c", acls("customers/c"))
        await dynsec.ensure_client("user-c", "old", ["role-c"])
        await dynsec.ensure_client("user-c", "new", ["role-c"])
        assert "user-c" in await dynsec.list_clients()
        assert [r["rolename"] for r in (await dynsec.get_client("user-c"))["roles"]] == ["role-c"]
    with pytest.raises(aiomqtt.MqttError):
        async with client(broker, "user-c", "old"):
            pass
    async with client(broker, "user-c", "new"):
        pass


async def connects(broker: EmbeddedMosquitto, user: str, password: str, client_id: str) -> bool:
    try:
        async with aiomqtt.Client(
            broker.host, broker.port, username=user, password=password, identifier=client_id
        ):
            return True
    except aiomqtt.MqttError:
        return False


async def test_a_bound_client_connects_only_with_its_client_id(broker) -> None:
    async with admin(broker) as dynsec:
        await dynsec.ensure_role("role-f", acls("customers/f"))
        await dynsec.ensure_client("user-f", "pw", ["role-f"], clientid="f-1")
        await dynsec.ensure_client("user-f", "pw", ["role-f"], clientid="f-1")
    assert await connects(broker, "user-f", "pw", "f-1")
    assert not await connects(broker, "user-f", "pw", "someone-else")
    async with admin(broker) as dynsec:
        # Bound anew, the password and roles kept: only the new id works.
        assert await dynsec.bind_client("user-f", "f-2", ["role-f"])
        assert not await dynsec.bind_client("nobody-here", "f-3", [])
        assert (await dynsec.get_client("user-f"))["clientid"] == "f-2"
    assert not await connects(broker, "user-f", "pw", "f-1")
    assert await connects(broker, "user-f", "pw", "f-2")


async def test_a_device_role_converges_to_publishing_only(broker) -> None:
    topics = ["customers/g/devices/1/readings", "customers/g/devices/1/status"]
    async with admin(broker) as dynsec:
        await dynsec.ensure_role("role-g", [Acl("publishClientSend", t) for t in topics])
        await dynsec.ensure_role("role-g", device_acls(topics))
        await dynsec.ensure_role("role-g", device_acls(topics))
        role = await dynsec.command("getRole", rolename="role-g")
    got = sorted(
        (a["acltype"], a["topic"], a["allow"], a["priority"]) for a in role["data"]["role"]["acls"]
    )
    assert got == sorted(
        [("publishClientSend", t, True, 0) for t in topics]
        + [("publishClientReceive", "#", False, -1), ("subscribePattern", "#", False, -1)]
    )


async def test_deleted_clients_cannot_connect_and_deleting_twice_is_fine(broker) -> None:
    async with admin(broker) as dynsec:
        await dynsec.ensure_role("role-d", acls("customers/d"))
        await dynsec.ensure_client("user-d", "pw", ["role-d"])
        await dynsec.delete_client("user-d")
        await dynsec.delete_client("user-d")
        await dynsec.delete_role("role-d")
        await dynsec.delete_role("role-d")
        assert await dynsec.get_client("user-d") is None
    with pytest.raises(aiomqtt.MqttError):
        async with client(broker, "user-d", "pw"):
            pass


async def test_a_wrong_admin_password_is_a_clear_error(broker) -> None:
    with pytest.raises(DynSecError, match="admin"):
        async with admin(broker, "not the password"):
            pass


async def test_clients_and_the_admin_survive_a_restart(tmp_path: Path) -> None:
    server = EmbeddedMosquitto(tmp_path / "m")
    server.start()
    try:
        password = server.admin_password
        async with admin(server) as dynsec:
            await dynsec.ensure_role("role-e", acls("customers/e"))
            await dynsec.ensure_client("user-e", "pw", ["role-e"])
        server.stop()
        server.start()
        assert server.admin_password == password
        assert (tmp_path / "m" / "admin-password").stat().st_mode & 0o077 == 0
        async with client(server, "user-e", "pw"):
            pass
    finally:
        server.stop()
