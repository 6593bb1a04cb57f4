"""Where each instance listens: a port of its own on this machine, recorded in the
provisioner's ``local_instances`` table (where it finds its instances again after a restart)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import asyncpg

from libs.servers.ports import free_port, port_is_free

log = logging.getLogger(__name__)


async def port_of(pool: asyncpg.Pool, host: str, customer_id: str, running: bool) -> int:
    """The instance's port: the one it has, unless another program took it meanwhile (the
    machine restarted, say), then a new one; its deployment then names the new URL. A port
    of an instance ``running`` here is its own, not taken."""
    async with pool.acquire() as conn, conn.transaction():
        port = await conn.fetchval(
            "SELECT port FROM local_instances WHERE customer_id = $1 FOR UPDATE", customer_id
        )
        if port is None:
            port = free_port(host)
            await conn.execute(
                "INSERT INTO local_instances (customer_id, port, created_at) VALUES ($1, $2, $3)",
                customer_id,
                port,
                datetime.now(UTC),
            )
        elif not running and not port_is_free(host, port):
            taken, port = port, free_port(host)
            log.warning(
                "instance of %s: port %d is taken by another program; moving to %d",
                customer_id,
                taken,
                port,
            )
            await conn.execute(
                "UPDATE local_instances SET port = $2 WHERE customer_id = $1", customer_id, port
            )
    return int(port)
