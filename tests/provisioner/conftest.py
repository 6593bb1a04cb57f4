"""The provisioner's own database for one test: a fresh one, migrated, and a pool on it; and
for modules that define a ``platform`` fixture, its HTTP app served on ``port`` and the admin
credential."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from libs.db.postgres import create_pool, migrate, service_migrations
from libs.runtime.platform import Platform
from services.targets import build_app
from support import create_database, serving


@pytest.fixture(scope="module")
async def client(platform: Platform, port: int) -> AsyncIterator[httpx.AsyncClient]:
    """The module's ``platform`` serving every target on ``port``, once it has started."""
    async with serving(build_app(platform, "all"), port) as http:
        await platform.wait_started()
        yield http


@pytest.fixture(scope="module")
def admin(platform: Platform) -> dict[str, str]:
    """The admin credential of the module's ``platform``."""
    return {"Authorization": f"Bearer {platform.settings.admin_token}"}


@pytest.fixture
async def provisioner_database(postgres_server_url: str) -> str:
    """A fresh database with the provisioner's schema; its URL."""
    url = await create_database(postgres_server_url)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, "provisioner", service_migrations("services.provisioner.migrations"))
    finally:
        await conn.close()
    return url


@pytest.fixture
async def pool(provisioner_database: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on ``provisioner_database``, with the provisioner's schema on its search path."""
    pool = await create_pool(provisioner_database, "provisioner", max_size=10)
    try:
        yield pool
    finally:
        await pool.close()
