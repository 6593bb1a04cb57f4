"""The instance's own database: migrated and pooled once it answers, checked for readiness.

The pool: up to ``POOL_MAX`` connections under load, and one once idle, which the periodic tasks
(alerts every 2 s) keep warm; a connection unused for ``POOL_IDLE_SECONDS`` is closed. Hundreds
of instances share one Postgres, whose connections are the scarce thing (an idle backend costs
it memory too).
"""

from __future__ import annotations

import logging

import asyncpg

from libs.db.postgres import CONNECTION_ERRORS, Turns, create_pool, load_migrations, migrate
from libs.runtime.supervision import retrying

log = logging.getLogger(__name__)

SCHEMA = "instance"
POOL_MAX = 6
POOL_IDLE_SECONDS = 10.0


class Database:
    """The pool of the instance's database, once there is one."""

    def __init__(self, url: str) -> None:
        """Nothing is connected until ``connect``."""
        self._url = url
        self.connected: asyncpg.Pool | None = None

    def pool(self) -> asyncpg.Pool:
        """The pool; a connection error (answered 503, retried) until the database answered."""
        if self.connected is None:
            raise asyncpg.exceptions.CannotConnectNowError("the database is not reachable yet")
        return self.connected

    def pool_if_connected(self) -> asyncpg.Pool | None:
        """The pool, or None until the database answered."""
        return self.connected

    async def connect(self) -> None:
        """Migrate the schema and open the pool, retried with backoff until the database
        answers."""
        async for attempt in retrying((*CONNECTION_ERRORS, asyncpg.PostgresError)):
            with attempt:
                try:
                    conn = await asyncpg.connect(self._url)
                    try:
                        await migrate(
                            conn, SCHEMA, load_migrations("services.instance.migrations", "service")
                        )
                    finally:
                        await conn.close()
                    self.connected = await create_pool(
                        self._url,
                        SCHEMA,
                        min_size=1,
                        max_size=POOL_MAX,
                        idle_seconds=POOL_IDLE_SECONDS,
                    )
                except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                    log.warning("database not reachable (%s); retrying", type(exc).__name__)
                    raise

    async def close(self) -> None:
        """Close the pool, if there is one."""
        if self.connected is not None:
            await self.connected.close()

    async def answers(self, turns: Turns) -> bool:
        """Whether the database answers a query now (readiness)."""
        if self.connected is None:
            return False
        try:
            # In turn with the periodic work, but never more than a second behind it.
            async with turns.acquire(timeout=1, wait_turn=1) as conn:
                await conn.fetchval("SELECT 1")
        except (*CONNECTION_ERRORS, asyncpg.PostgresError, TimeoutError):
            return False
        return True
