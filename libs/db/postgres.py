"""Postgres for a service: one pool, one schema, plain-SQL migrations applied in order.

Each service owns a schema named after it and sets ``search_path`` to it on every connection, so
its SQL names its tables without a schema and the same code can be pointed at a scratch schema
(``iotistic replay --verify`` builds read models there to compare them with the live ones).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable

import asyncpg

log = logging.getLogger(__name__)

_SCHEMA_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_MIGRATION_NAME = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")

# Tables every service needs for its projections; applied before the service's own migrations.
LIB_MIGRATIONS_PACKAGE = "libs.projections.migrations"

Pool = asyncpg.Pool
Connection = asyncpg.Connection

# asyncpg errors that mean "the database is not reachable right now", as opposed to a bad query.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ConnectionError,
    TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.ConnectionFailureError,
    # A connection whose protocol state broke mid-operation ("cannot switch to state 15;
    # another operation is in progress", seen during COMMIT when Postgres was killed): the
    # connection is unusable and a new one works.
    asyncpg.exceptions.InternalClientError,
)


class MigrationError(RuntimeError):
    """An applied migration was changed, or a migration failed to apply."""


@dataclass(frozen=True)
class Migration:
    """One plain-SQL migration file: ``<number>_<name>.sql``."""

    source: str
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the SQL, to notice an applied migration that was edited afterwards."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def check_schema_name(schema: str) -> str:
    """Return ``schema`` if it is a safe unquoted identifier, else raise ``ValueError``."""
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"invalid schema name {schema!r}: use lower-case letters, digits, _")
    return schema


def load_migrations(package: str, source: str) -> list[Migration]:
    """Read ``NNN_name.sql`` files from a package folder, in numeric order."""
    folder: Traversable = resources.files(package)
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            continue
        found.append(
            Migration(
                source=source,
                version=match.group(1),
                name=entry.name,
                sql=entry.read_text(encoding="utf-8"),
            )
        )
    found.sort(key=lambda m: int(m.version))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{package}: two migrations share a number: {versions}")
    return found


def service_migrations(package: str) -> list[Migration]:
    """The projection infrastructure's migrations followed by the service's own."""
    return load_migrations(LIB_MIGRATIONS_PACKAGE, "lib") + load_migrations(package, "service")


async def create_pool(
    dsn: str,
    schema: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    idle_seconds: float = 300.0,
) -> asyncpg.Pool:
    """A pool whose connections use ``schema`` first on their search path.

    The pool is created lazily connected (min_size connections are opened on first use), so a
    service starts even while Postgres is still coming up, and reports not-ready until it is.
    A connection beyond ``min_size`` unused for ``idle_seconds`` is closed (asyncpg keeps the
    ``min_size`` floor open), so a burst leaves no connections behind once it is over.
    """
    check_schema_name(schema)
    pool = asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        max_inactive_connection_lifetime=idle_seconds,
        server_settings={
            "search_path": f"{schema},public",
            "application_name": f"iotistic-{schema}",
        },
        command_timeout=30,
        reset=_keep_session,
    )
    # asyncpg pools connect on first await; keep that explicit for the caller.
    return await pool


class Turns:
    """A pool's connections for work that takes turns: one holder at a time.

    Periodic work of a process that is otherwise idle (alert passes, housekeeping, reports,
    readiness checks) finds the pool's one warm connection free when it takes its turn,
    instead of opening another when two happen to fall together; so an idle process holds
    one connection. Requests and ingest use the pool itself, as many at once as it allows.
    """

    def __init__(self, pool: Callable[[], asyncpg.Pool]) -> None:
        """``pool`` gives the pool (it may raise while the database is not reachable yet)."""
        self._pool = pool
        self._turn = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def acquire(
        self, timeout: float | None = None, *, wait_turn: float | None = None
    ) -> AsyncIterator[asyncpg.Connection]:
        """A connection once it is this holder's turn (``timeout`` as the pool's). With
        ``wait_turn``, a holder that has waited that long goes ahead beside the others
        (a readiness check must not wait behind a long alert pass)."""
        my_turn = True
        try:
            async with asyncio.timeout(wait_turn):
                await self._turn.acquire()
        except TimeoutError:
            my_turn = False
        try:
            async with self._pool().acquire(timeout=timeout) as conn:
                yield conn
        finally:
            if my_turn:
                self._turn.release()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset round trip on every release (advisory unlock, CLOSE ALL, UNLISTEN,
    RESET ALL): pooled connections never take session locks, LISTEN, hold cursors or SET
    anything (the search path is a startup parameter), and asyncpg still ends any transaction.
    """


async def migrate(
    conn: asyncpg.Connection, schema: str, migrations: Sequence[Migration]
) -> list[str]:
    """Apply the migrations not yet recorded in ``schema``; return the names applied.

    Runs in one transaction under an advisory lock keyed on the schema, so replicas starting
    together apply each migration once. A recorded migration whose SQL changed is refused.
    """
    check_schema_name(schema)
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"migrate:{schema}")
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await conn.execute(f"SET LOCAL search_path TO {schema}, public")
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                source text NOT NULL,
                version text NOT NULL,
                name text NOT NULL,
                checksum text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (source, version)
            )
            """
        )
        rows = await conn.fetch("SELECT source, version, name, checksum FROM schema_migrations")
        recorded = {(r["source"], r["version"]): r for r in rows}
        for migration in migrations:
            known = recorded.get((migration.source, migration.version))
            if known is not None:
                if known["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"{schema}: migration {migration.source}/{migration.name} was changed "
                        "after it was applied; add a new migration instead"
                    )
                continue
            try:
                await conn.execute(migration.sql)
            except asyncpg.PostgresError as exc:
                raise MigrationError(
                    f"{schema}: migration {migration.source}/{migration.name} failed: {exc}"
                ) from exc
            await conn.execute(
                "INSERT INTO schema_migrations (source, version, name, checksum) "
                "VALUES ($1, $2, $3, $4)",
                migration.source,
                migration.version,
                migration.name,
                migration.checksum,
            )
            applied.append(f"{migration.source}/{migration.name}")
    if applied:
        log.info("schema %s: applied %s", schema, ", ".join(applied))
    return applied


async def drop_schema(conn: asyncpg.Connection, schema: str) -> None:
    """Drop a schema and everything in it (scratch schemas of replay, tests)."""
    check_schema_name(schema)
    await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


async def ping(pool: asyncpg.Pool, timeout: float = 2.0) -> None:
    """Raise unless the database answers within ``timeout`` seconds."""
    async with pool.acquire(timeout=timeout) as conn:
        await conn.fetchval("SELECT 1", timeout=timeout)
