"""The event log as the operator's commands reach it: with the operator's bus credentials,
finding the stream (only ``iotistic events init`` makes it), closed afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import nats.js.errors

from libs.config import ConfigError, EventLogSettings, ServiceSettings
from libs.eventlog.bus_auth import OPERATOR, BusAuthError
from libs.eventlog.connection import connect_bus
from libs.eventlog.store import EventStore


@contextlib.asynccontextmanager
async def event_log(settings: ServiceSettings) -> AsyncIterator[EventStore]:
    """The event log, as its operator (``NATS_CREDENTIALS_DIR``/operator), closed afterwards.

    Only ``iotistic events init`` makes or changes the stream: a tool that reads finds it or
    says that it is not there.
    """
    nc = await operator_connection(settings)
    try:
        store = EventStore(nc.jetstream(), settings)
        try:
            await store.stream_info()
        except nats.js.errors.NotFoundError:
            raise ConfigError(
                f"the event stream {store.stream} does not exist at NATS_URL; "
                "`iotistic events init` makes it"
            ) from None
        yield store
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def connected(settings: ServiceSettings) -> AsyncIterator[tuple[EventStore, Any]]:
    """The event log (as its operator) and a database connection, closed afterwards."""
    async with event_log(settings) as store:
        conn = await asyncpg.connect(settings.database_url)
        try:
            yield store, conn
        finally:
            await conn.close()


async def operator_connection(settings: EventLogSettings) -> Any:
    """A connection to NATS as the bus's operator; a missing or wrong password is a
    configuration error."""
    try:
        return await connect_bus(settings, OPERATOR, name="iotistic-cli")
    except BusAuthError as exc:
        raise ConfigError(f"NATS_CREDENTIALS_DIR: {exc}") from None
