"""Each instance's database on the shared Postgres: a database and a role of its own, which
may connect to no other database and holds a bounded number of connections."""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from libs.db.postgres import CONNECTION_ERRORS
from services.provisioner.backends.base import BackendError

# Connections an instance's database role may hold at once (its pool is 6).
INSTANCE_ROLE_CONNECTIONS = 12
# The advisory lock serialising the databases' creation and access rules across provisioners.
DATABASE_ACL_LOCK = 0x10715_D8AC1
# Instance roles, by the only name ``instance_name`` makes.
INSTANCE_ROLE = r"^inst_[0-9a-f]{32}$"


def database_url(admin_url: str, name: str, password: str) -> str:
    """The instance's URL of its database ``name``, as role ``name``, on the server of
    ``admin_url``."""
    parts = urlsplit(admin_url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{name}:{quote(password)}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, f"/{name}", parts.query, ""))


async def _connect(admin_url: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(admin_url)
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        raise BackendError(f"database server not reachable: {type(exc).__name__}") from None


async def ensure_database(admin_url: str, name: str, password: str) -> str:
    """Make (or converge) the role and database ``name``, the role's password ``password``,
    confined to its own database; returns the instance's URL of it."""
    conn = await _connect(admin_url)
    try:
        # One deploy's database at a time, from creation to confinement: a database made
        # meanwhile by another deploy lets every role connect until its own REVOKE, and
        # would fail this deploy's check that its role can connect nowhere else.
        await conn.execute("SELECT pg_advisory_lock($1)", DATABASE_ACL_LOCK)
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name)
        # Set again on every deploy: the password follows PROVISIONER_SECRET if it changed.
        await conn.execute(
            await conn.fetchval(
                "SELECT format('%s ROLE %I LOGIN PASSWORD %L', $3::text, $1::text, $2::text)",
                name,
                password,
                "ALTER" if exists else "CREATE",
            )
        )
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(
                await conn.fetchval(
                    "SELECT format('CREATE DATABASE %I OWNER %I', $1::text, $1::text)", name
                )
            )
        # An instance holds a pool of 6 and a connection or two besides; a role holding
        # more (its password in a tenant's hands) would take the shared server's slots.
        await conn.execute(
            await conn.fetchval(
                "SELECT format('ALTER ROLE %I CONNECTION LIMIT %s', $1::text, $2::int)",
                name,
                INSTANCE_ROLE_CONNECTIONS,
            )
        )
        # Nobody but the owner may connect to a customer's database (in _confine_role).
        await _confine_role(conn, name)
    except asyncpg.PostgresError as exc:
        raise BackendError(f"creating the database failed: {exc.sqlstate}") from None
    finally:
        await conn.close()
    return database_url(admin_url, name, password)


async def drop_database(admin_url: str, name: str) -> None:
    """Drop the database and the role ``name`` (fine if they are not there)."""
    conn = await _connect(admin_url)
    try:
        for statement in (
            "SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE)', $1::text)",
            "SELECT format('DROP ROLE IF EXISTS %I', $1::text)",
        ):
            await conn.execute(await conn.fetchval(statement, name))
    except asyncpg.PostgresError as exc:
        raise BackendError(f"dropping the database failed: {exc.sqlstate}") from None
    finally:
        await conn.close()


async def _confine_role(conn: asyncpg.Connection, role: str) -> None:
    """``role`` (an instance's) may connect to no database but its own.

    Postgres grants CONNECT to PUBLIC on every new database (the control plane's, ``postgres``,
    ``template1``, ...) and cannot take it from one role alone, so it is taken from PUBLIC on
    every database but the instance's own, after the roles that are not instances' and could
    connect (the control plane's own) have been granted it by name. Roles made later need an
    explicit ``GRANT CONNECT``. The instance's own database is taken from PUBLIC too (its
    owner keeps it), under the same lock as the others."""
    async with conn.transaction():
        # One deploy at a time: concurrent GRANTs on one database fail each other (a session
        # holding the lock already, as _ensure_database's, is granted it again at once).
        await conn.execute("SELECT pg_advisory_xact_lock($1)", DATABASE_ACL_LOCK)
        # Its own database too, under the lock: another deploy's pass below may be changing
        # this new database's grants, and two at once fail ("tuple concurrently updated").
        await conn.execute(
            await conn.fetchval(
                "SELECT format('REVOKE CONNECT ON DATABASE %I FROM PUBLIC', $1::text)", role
            )
        )
        databases = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datallowconn AND datname <> $1 "
            "AND (has_database_privilege('public', oid, 'CONNECT') "
            "OR has_database_privilege($1, oid, 'CONNECT'))",
            role,
        )
        for database in (r["datname"] for r in databases):
            keep = await conn.fetch(
                "SELECT rolname FROM pg_roles WHERE rolcanlogin AND NOT rolsuper "
                "AND rolname !~ $2 AND has_database_privilege(oid, "
                "(SELECT oid FROM pg_database WHERE datname = $1), 'CONNECT')",
                database,
                INSTANCE_ROLE,
            )
            statements = [
                *(("GRANT CONNECT ON DATABASE %I TO %I", r["rolname"]) for r in keep),
                ("REVOKE CONNECT ON DATABASE %I FROM PUBLIC", None),
                ("REVOKE CONNECT ON DATABASE %I FROM %I", role),
            ]
            for template, grantee in statements:
                await conn.execute(
                    await conn.fetchval(
                        "SELECT format($1::text, $2::text, $3::text)", template, database, grantee
                    )
                )
        still = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datallowconn AND datname <> $1 "
            "AND has_database_privilege($1, oid, 'CONNECT') ORDER BY datname",
            role,
        )
    if still:
        names = ", ".join(r["datname"] for r in still[:5])
        raise BackendError(
            f"the instance's database role could still connect to {names}: the role in "
            "LOCAL_ADMIN_DATABASE_URL must own those databases or be a superuser"
        )
