"""How many instances this machine holds: the connections the shared Postgres has for them,
and the memory here."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

import asyncpg
import psutil

from libs.db.postgres import CONNECTION_ERRORS

log = logging.getLogger(__name__)

MIB = 1024 * 1024


def connection_capacity(
    max_connections: int, reserved: int, control_plane: int, per_instance: int
) -> int:
    """Instances the shared Postgres has connections for: what it allows, less what it keeps
    for superusers (``reserved``) and for the control plane, each instance taking
    ``per_instance``."""
    return max(0, (max_connections - reserved - control_plane) // per_instance)


def memory_capacity(available: int, held: int, share: float, per_instance: int) -> int:
    """Instances this machine's memory holds: the memory available now plus what the running
    instances hold (``held``, their RSS), of which instances may take ``share``, each
    ``per_instance`` (bytes)."""
    return max(0, int((available + held) * share) // per_instance)


async def measured_connection_capacity(
    admin_url: str, control_plane: int, per_instance: int
) -> int | None:
    """``connection_capacity`` of the server of ``admin_url`` as it is configured now; None
    when it cannot be read (the server does not answer, or refuses)."""
    try:
        conn = await asyncpg.connect(admin_url, timeout=5)
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        log.warning("capacity: database not reachable (%s); last bound kept", exc)
        return None
    try:
        limits = await conn.fetchrow(
            "SELECT current_setting('max_connections')::int AS max_connections, "
            "current_setting('superuser_reserved_connections')::int AS superusers, "
            # Postgres 16 keeps these for roles granted pg_use_reserved_connections.
            "coalesce(current_setting('reserved_connections', true), '0')::int AS reserved"
        )
    except asyncpg.PostgresError as exc:
        log.warning("capacity: reading max_connections failed (%s)", exc.sqlstate)
        return None
    finally:
        await conn.close()
    return connection_capacity(
        limits["max_connections"],
        limits["superusers"] + limits["reserved"],
        control_plane,
        per_instance,
    )


def measured_memory_capacity(pids: Iterable[int], share: float, per_instance_mib: int) -> int:
    """``memory_capacity`` of this machine now, the instances ``pids`` running."""
    held = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            held += psutil.Process(pid).memory_info().rss
    return memory_capacity(psutil.virtual_memory().available, held, share, per_instance_mib * MIB)
