"""The provisioner's own database for one test: a fresh one, migrated, and a pool on it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from libs.db import create_pool, migrate, service_migrations
from support import create_database


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
