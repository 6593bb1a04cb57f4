"""An instance's database role reaches its own database and no other (local backend).

Issue 11: instance roles could CONNECT to the ``iotistic`` and ``postgres`` databases, since
only instance databases had CONNECT revoked from PUBLIC. Now every deploy revokes it from
PUBLIC on every other database too, after granting it by name to the roles that are not
instances' and had it (the control plane's own). Real Postgres, real instance processes.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from tenant_instances import control_plane, sign_up

from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.servers.mosquitto import EmbeddedMosquitto
from services.provisioner.backends.base import derive_password
from services.provisioner.backends.local.backend import instance_name
from services.provisioner.backends.local.database import INSTANCE_ROLE_CONNECTIONS
from support import with_database

pytestmark = pytest.mark.slow

REPORTING_PASSWORD = secrets.token_urlsafe(16)


def as_role(server_url: str, role: str, password: str, database: str) -> str:
    """``server_url`` (the superuser's) with another role, password and database."""
    parts = urlsplit(with_database(server_url, database))
    netloc = f"{role}:{quote(password)}@{parts.hostname}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


async def can_connect(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url)
    except asyncpg.InsufficientPrivilegeError:
        return False
    await conn.close()
    return True


@pytest.fixture(scope="module")
async def reporting(postgres_server_url: str) -> str:
    """A role of the operator's (not a superuser), which can connect through PUBLIC, and a
    database named like the control plane's in production."""
    role = f"reporting_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(postgres_server_url)
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{REPORTING_PASSWORD}'")
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = 'iotistic'"):
            await conn.execute("CREATE DATABASE iotistic")
        # The suite's server is shared: an instance deployed by an earlier module has already
        # revoked PUBLIC's CONNECT. Give it back, as on a server no instance ran on yet, so the
        # role reaches these databases through PUBLIC, as an operator's role would before.
        for database in ("iotistic", "postgres"):
            await conn.execute(f"GRANT CONNECT ON DATABASE {database} TO PUBLIC")
    finally:
        await conn.close()
    return role


@pytest.fixture(scope="module")
async def client(
    settings: ServiceSettings,
    store: EventStore,
    broker: EmbeddedMosquitto,
    port: int,
    reporting: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[httpx.AsyncClient]:
    async with control_plane(settings, broker, port, tmp_path_factory.mktemp("tenants")) as http:
        yield http


async def test_an_instance_role_connects_only_to_its_own_database(
    client, settings, postgres_server_url, reporting
) -> None:
    tenant = await sign_up(client, "heidi@example.com")
    await tenant.api.aclose()
    name = instance_name(tenant.id)
    password = derive_password(b"p" * 40, "database", name)
    control_plane_database = settings.database_url.rsplit("/", 1)[1]
    assert await can_connect(as_role(postgres_server_url, name, password, name))
    for database in ("iotistic", "postgres", "template1", control_plane_database):
        url = as_role(postgres_server_url, name, password, database)
        assert not await can_connect(url), f"the instance's role connected to {database}"
    # A tenant who learned the role's password cannot take the shared server's connections.
    holding: list[asyncpg.Connection] = []
    refused: BaseException | None = None
    try:
        for _ in range(INSTANCE_ROLE_CONNECTIONS + 1):
            try:
                holding.append(
                    await asyncpg.connect(as_role(postgres_server_url, name, password, name))
                )
            except asyncpg.TooManyConnectionsError as exc:
                refused = exc
                break
    finally:
        for conn in holding:
            await conn.close()
    assert refused is not None, "the role held more connections than its limit"
    assert len(holding) <= INSTANCE_ROLE_CONNECTIONS
    # The control plane's (and the operator's) roles go on working.
    for database in ("iotistic", "postgres", control_plane_database):
        assert await can_connect(
            as_role(postgres_server_url, reporting, REPORTING_PASSWORD, database)
        ), database
    assert (await client.get("/health/ready")).status_code == 200
