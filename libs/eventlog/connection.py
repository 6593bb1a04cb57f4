"""Connecting to the bus: a NATS connection as one bus user, that reconnects forever once made.

Every service, tool and test reaches the event log through ``connect_bus`` (a user's password
from NATS_CREDENTIALS_DIR, ``libs/eventlog/bus_auth.py``) or ``connect_nats`` (a URL). A server
that refuses the credentials is named as such (``CredentialsRefused``) instead of nats-py's
"no servers available".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient

from libs.config import EventLogSettings
from libs.eventlog.bus_auth import Credentials, inbox_prefix

log = logging.getLogger(__name__)

# What a NATS or JetStream call raises when the bus is away or slow: worth trying again.
NATS_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.Error,
    nats.js.errors.Error,
    OSError,
    TimeoutError,
)


class CredentialsRefused(nats.errors.Error):
    """The NATS server refused the user or password a connection gave."""


def server_asks_for_credentials(nc: NatsClient) -> bool:
    """Whether the server ``nc`` is connected to requires clients to authenticate."""
    info: Mapping[str, Any] = getattr(nc, "_server_info", {})  # nats-py keeps its INFO here
    return bool(info.get("auth_required"))


async def drain_quietly(nc: NatsClient) -> None:
    """Drain ``nc`` (deliver what is in flight, then close), giving up after 5 s."""
    if nc.is_closed:
        return
    with contextlib.suppress(*NATS_ERRORS):
        await asyncio.wait_for(nc.drain(), timeout=5)


async def connect_bus(
    settings: EventLogSettings, user: str, *, name: str | None = None, attempts: int = 3
) -> NatsClient:
    """A NATS connection as bus user ``user``, with its password from NATS_CREDENTIALS_DIR.

    Without a credentials folder the connection gives no credentials (a bus that asks for
    none). ``BusAuthError`` names a missing password file.
    """
    folder = settings.nats_credentials_dir
    if folder is None:
        return await connect_nats(settings.nats_url, name=name or user, attempts=attempts)
    password = Credentials(Path(folder)).password(user)
    return await connect_nats(
        settings.nats_url, name=name or user, attempts=attempts, user=user, password=password
    )


class _ConnectionEvents:
    """nats-py's callbacks for one connection: each thing it reports, logged as it deserves."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.client: NatsClient | None = None
        # What the server said when it refused the credentials, if it did.
        self.refused: list[str] = []

    async def on_error(self, exc: Exception) -> None:
        if "authorization violation" in str(exc).lower():
            self.refused.append(str(exc))
        # A refused publish or subscription is a bug or an attack, never noise: say so.
        if "permissions violation" in str(exc).lower():
            log.error("nats (%s): %s", self.who, exc)
            return
        log.debug("nats: %s", exc)

    async def on_disconnected(self) -> None:
        # Closing on purpose also "disconnects"; only an unplanned loss is worth a warning.
        if self.client is not None and (self.client.is_closed or self.client.is_draining):
            return
        log.warning("nats: disconnected")

    async def on_reconnected(self) -> None:
        log.info("nats: reconnected")


async def connect_nats(
    url: str,
    name: str = "iotistic",
    attempts: int = 3,
    *,
    user: str | None = None,
    password: str | None = None,
) -> NatsClient:
    """A NATS connection that, once made, reconnects forever.

    The first connection is tried ``attempts`` times per server and then fails with a NATS
    error, so a caller (the platform's start loop, a CLI command) can report it instead of
    hanging silently. With ``user``, replies come to that user's own inbox prefix, the only
    one the bus lets it subscribe to.
    """
    events = _ConnectionEvents(user or name)
    credentials: dict[str, Any] = {}
    if user is not None:
        credentials = {"user": user, "password": password, "inbox_prefix": inbox_prefix(user)}
    try:
        client = await nats.connect(
            servers=[u.strip() for u in url.split(",") if u.strip()],
            name=name,
            allow_reconnect=True,
            max_reconnect_attempts=attempts,
            reconnect_time_wait=1,
            connect_timeout=2,
            error_cb=events.on_error,
            disconnected_cb=events.on_disconnected,
            reconnected_cb=events.on_reconnected,
            **credentials,
        )
    except NATS_ERRORS as exc:
        if events.refused:
            # nats-py reports only "no servers available": say what the server said.
            raise CredentialsRefused(
                f"NATS refused the credentials of {user or 'this client'} (Authorization "
                "Violation): check its password file in NATS_CREDENTIALS_DIR and the server's "
                "authorization block"
            ) from exc
        raise
    # nats-py reads this option on every reconnect: from now on, never give up.
    client.options["max_reconnect_attempts"] = -1
    events.client = client
    return client
