"""Fixtures the security tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from tenant_instances import control_plane

from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.servers.mosquitto import EmbeddedMosquitto


@pytest.fixture(scope="module")
async def client(
    settings: ServiceSettings,
    store: EventStore,
    broker: EmbeddedMosquitto,
    port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the module's control plane (local backend), where customers sign up and
    get instances of their own on the module's broker (a module may define its own)."""
    async with control_plane(settings, broker, port, tmp_path_factory.mktemp("tenants")) as http:
        yield http
