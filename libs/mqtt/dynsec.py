"""Administering Mosquitto's dynamic security over MQTT: roles, ACLs and clients.

Commands go to ``$CONTROL/dynamic-security/v1`` as JSON, each with correlation data, and the
answer is read from ``$CONTROL/dynamic-security/v1/response``. The ``ensure_*`` and
``delete_*`` calls converge: creating what exists updates it, deleting what is gone succeeds,
so a retried deployment job does the same thing twice without failing.

Every client the platform makes is bound to one client id (dynamic security's ``clientid``):
the broker refuses its user name with any other id, so no client can connect under another's
client id and take over (or wipe) that client's session.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aiomqtt

CONTROL = "$CONTROL/dynamic-security/v1"
# Where devices that registered themselves (fleet provisioning) publish: ``<FLEET_ROOT>/<uuid>``.
FLEET_ROOT = "iot/device"
RESPONSE = f"{CONTROL}/response"


def owner_text(customer_id: str) -> str:
    """The text name of the broker clients a customer's devices registered themselves (fleet
    provisioning): whose they are, so that they go with the customer."""
    return f"customer:{customer_id}"


class DynSecError(Exception):
    """The broker refused a command, or did not answer in time."""


@dataclass(frozen=True)
class Acl:
    """One ACL of a role: ``acltype`` such as ``publishClientSend`` or ``subscribePattern``."""

    acltype: str
    topic: str
    allow: bool = True
    priority: int = 0

    def as_command(self) -> dict[str, Any]:
        """The ACL as dynamic security writes it."""
        return {
            "acltype": self.acltype,
            "topic": self.topic,
            "allow": self.allow,
            "priority": self.priority,
        }


def subtree_acls(root: str) -> list[Acl]:
    """What a client confined to one subtree may do: everything under ``<root>/`` and nothing
    else. Dynamic security lets clients receive anything by default, so receiving
    is also denied outside the customer's topics, a second lock behind the subscribe ACL."""
    root = f"{root}/#"
    return [
        Acl("publishClientSend", root),
        Acl("subscribePattern", root),
        Acl("publishClientReceive", root),
        Acl("publishClientReceive", "#", allow=False, priority=-1),
    ]


def device_acls(topics: list[str]) -> list[Acl]:
    """What a device may do: publish to its own ``topics`` and nothing else. Subscribing and
    receiving are denied everywhere (lowest priority, under the allows), so a device gets no
    message even on a session that holds subscriptions it did not make."""
    return [
        *(Acl("publishClientSend", topic) for topic in topics),
        Acl("subscribePattern", "#", allow=False, priority=-1),
        Acl("publishClientReceive", "#", allow=False, priority=-1),
    ]


class DynSec:
    """A connection to the broker as its dynamic-security admin."""

    def __init__(
        self, host: str, port: int, username: str, password: str, timeout: float = 5.0
    ) -> None:
        """Connects on ``async with``; passwords are never logged."""
        self._host, self._port = host, port
        self._client = aiomqtt.Client(
            host,
            port,
            username=username,
            password=password,
            identifier=f"iotistic-dynsec-{secrets.token_hex(6)}",
            timeout=timeout,
        )
        self._timeout = timeout
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        try:
            await asyncio.wait_for(self._client.__aenter__(), self._timeout)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            raise DynSecError(f"cannot connect to the broker as its admin: {exc}") from None
        await self._client.subscribe(RESPONSE, qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self._client.__aexit__(exc_type, exc, traceback)

    async def _read(self) -> None:
        async for message in self._client.messages:
            try:
                body = json.loads(bytes(message.payload))
            except (TypeError, ValueError):
                continue
            for response in body.get("responses", []):
                waiter = self._waiting.pop(str(response.get("correlationData")), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(response)

    async def command(self, name: str, **arguments: Any) -> dict[str, Any]:
        """Send one command and return its response; raises ``DynSecError`` on an error."""
        response = await self._send(name, arguments)
        if "error" in response:
            raise DynSecError(f"{name}: {response['error']}")
        return response

    async def _send(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        correlation = secrets.token_hex(8)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[correlation] = waiter
        payload = {"commands": [{"command": name, **arguments, "correlationData": correlation}]}
        try:
            await self._client.publish(CONTROL, json.dumps(payload), qos=1)
            return await asyncio.wait_for(waiter, self._timeout)
        except TimeoutError:
            raise DynSecError(
                f"{name}: the broker did not answer within {self._timeout}s"
            ) from None
        except aiomqtt.MqttError as exc:
            raise DynSecError(f"{name}: {exc}") from None
        finally:
            self._waiting.pop(correlation, None)

    async def _tolerating(self, tolerated: str, name: str, **arguments: Any) -> bool:
        """Run a command; True if it did something, False if it hit ``tolerated``."""
        response = await self._send(name, arguments)
        error = response.get("error")
        if error is None:
            return True
        if tolerated.lower() in str(error).lower():
            return False
        raise DynSecError(f"{name}: {error}")

    async def ensure_role(self, name: str, acls: list[Acl]) -> None:
        """The role exists with exactly these ACLs. Only what differs is changed, new ACLs
        before old ones go, so converging a role in use never leaves it empty for a moment."""
        wanted = {(a.acltype, a.topic): a.as_command() for a in acls}
        if await self._tolerating(
            "already exists", "createRole", rolename=name, acls=list(wanted.values())
        ):
            return
        current = (await self.command("getRole", rolename=name)).get("data", {}).get("role", {})
        have = {(a["acltype"], a["topic"]): a for a in current.get("acls", [])}
        for key, acl in wanted.items():
            if key not in have:
                await self.command("addRoleACL", rolename=name, **acl)
        for key, acl in have.items():
            wanted_acl = wanted.get(key)
            if wanted_acl is not None and all(acl.get(k) == v for k, v in wanted_acl.items()):
                continue
            await self._tolerating(
                "not found", "removeRoleACL", rolename=name, acltype=key[0], topic=key[1]
            )
            if wanted_acl is not None:
                await self.command("addRoleACL", rolename=name, **wanted_acl)

    async def create_role(self, name: str, acls: list[Acl]) -> bool:
        """Make the role with these ACLs if there is none; an existing role is left as it is.
        True if it was made."""
        return await self._tolerating(
            "already exists", "createRole", rolename=name, acls=[a.as_command() for a in acls]
        )

    async def add_role_acls(self, name: str, acls: list[Acl]) -> None:
        """Add these ACLs to the role (one already there is replaced)."""
        for acl in acls:
            await self._tolerating(
                "not found", "removeRoleACL", rolename=name, acltype=acl.acltype, topic=acl.topic
            )
            await self.command("addRoleACL", rolename=name, **acl.as_command())

    async def remove_role_acls(self, name: str, acls: list[Acl]) -> None:
        """Remove these ACLs from the role; fine where one is not there."""
        for acl in acls:
            await self._tolerating(
                "not found", "removeRoleACL", rolename=name, acltype=acl.acltype, topic=acl.topic
            )

    async def ensure_client(
        self,
        username: str,
        password: str,
        roles: list[str],
        textname: str | None = None,
        clientid: str | None = None,
        priorities: dict[str, int] | None = None,
    ) -> None:
        """The client exists with this password, exactly these roles (each with its priority
        in ``priorities``, else the broker's default of -1: the broker checks a client's roles
        from the highest priority down, and the first ACL that matches decides) and, given
        ``clientid``, bound to that client id (without one: any id)."""
        ranks = priorities or {}
        role_list = [{"rolename": r, "priority": ranks.get(r, -1)} for r in roles]
        extra: dict[str, Any] = {"textname": textname} if textname else {}
        if clientid:
            extra["clientid"] = clientid
        if await self._tolerating(
            "already exists",
            "createClient",
            username=username,
            password=password,
            roles=role_list,
            **extra,
        ):
            return
        await self.command("setClientPassword", username=username, password=password)
        client = await self.get_client(username) or {}
        await self._converge_client(username, client, roles, clientid, ranks)

    async def bind_client(self, username: str, clientid: str, roles: list[str]) -> bool:
        """An existing client, its password untouched, bound to ``clientid`` with exactly
        these roles; False when there is no such client."""
        client = await self.get_client(username)
        if client is None:
            return False
        await self._converge_client(username, client, roles, clientid, {})
        return True

    async def _converge_client(
        self,
        username: str,
        client: dict[str, Any],
        roles: list[str],
        clientid: str | None,
        priorities: dict[str, int],
    ) -> None:
        if client.get("clientid") != clientid:
            # The broker disconnects the client if it is connected under another id.
            bound = {"clientid": clientid} if clientid else {}
            await self.command("setClientId", username=username, **bound)
        have = {r["rolename"]: int(r.get("priority", -1)) for r in client.get("roles", [])}
        for role, priority in have.items():
            if role not in roles or priority != priorities.get(role, -1):
                await self.command("removeClientRole", username=username, rolename=role)
        for role in roles:
            priority = priorities.get(role, -1)
            if have.get(role) != priority:
                await self.command(
                    "addClientRole", username=username, rolename=role, priority=priority
                )

    async def get_client(self, username: str) -> dict[str, Any] | None:
        """The client's record, or None."""
        response = await self._send("getClient", {"username": username})
        if "error" in response:
            return None
        client: dict[str, Any] = response.get("data", {}).get("client", {})
        return client

    async def list_clients(self) -> list[str]:
        """Every client's user name."""
        response = await self.command("listClients", verbose=False)
        return [str(c) for c in response.get("data", {}).get("clients", [])]

    async def clients_named(self, textname: str) -> list[str]:
        """The user names of the clients whose text name is ``textname``."""
        response = await self.command("listClients", verbose=True)
        return [
            str(c["username"])
            for c in response.get("data", {}).get("clients", [])
            if isinstance(c, dict) and c.get("textname") == textname and "username" in c
        ]

    async def delete_client(self, username: str) -> None:
        """The client is gone (and disconnected); fine if it never existed."""
        await self._tolerating("not found", "deleteClient", username=username)

    async def delete_role(self, name: str) -> None:
        """The role is gone; fine if it never existed."""
        await self._tolerating("not found", "deleteRole", rolename=name)

    async def clear_retained(self, username: str, clientid: str, root: str) -> list[str]:
        """Empty every retained message under ``<root>/#``, as the client ``username`` (bound
        to ``clientid``) that is about to be deleted: what a device left retained under its own
        topics, or was sent there, is not handed to whoever holds them next. Its password is
        replaced first (whoever is connected with it is pushed off and stays out) and it holds,
        for this, a role (``<username>.clearing``, removed after) that may do anything under
        ``root``. Answers the topics it emptied."""
        password = secrets.token_urlsafe(24)
        # A "." is in no user name or uuid: this role is never another client's.
        clearing = f"{username}.clearing"
        await self.command("setClientPassword", username=username, password=password)
        everything = ("subscribePattern", "publishClientReceive", "publishClientSend")
        await self.ensure_role(clearing, [Acl(t, f"{root}/#", priority=9) for t in everything])
        await self.command("addClientRole", username=username, rolename=clearing, priority=9)
        try:
            return await self._clear_retained_as(username, password, clientid, root)
        finally:
            await self.delete_role(clearing)

    async def _clear_retained_as(
        self, username: str, password: str, clientid: str, root: str
    ) -> list[str]:
        found: list[str] = []
        try:
            async with aiomqtt.Client(
                self._host,
                self._port,
                username=username,
                password=password,
                identifier=clientid,
                timeout=self._timeout,
            ) as mqtt:
                await mqtt.subscribe(f"{root}/#", qos=0)
                # The broker sends a new subscription's retained messages before it answers
                # the next packet: all of them have arrived once the unsubscribe is answered.
                await mqtt.unsubscribe(f"{root}/#")
                while len(mqtt.messages):
                    message = await anext(aiter(mqtt.messages))
                    if message.retain and str(message.topic) not in found:
                        found.append(str(message.topic))
                for topic in found:
                    await mqtt.publish(topic, b"", qos=1, retain=True)
        except aiomqtt.MqttError as exc:
            raise DynSecError(f"cannot clear the retained messages under {root}: {exc}") from None
        return found
