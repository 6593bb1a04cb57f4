"""Housekeeping removes a fleet device whose key exchange never came within a day, and the
device completes its key exchange just then: housekeeping had listed it as abandoned, and is
waiting for the devices' lock (a registration or a deletion holds it) when the key exchange
comes. The device completed its provisioning and must stay; a key exchange that comes after
the removal is refused (the device registers again).
"""

from __future__ import annotations

import asyncio

import pytest
from fleet_fault_steps import KEY, running_instance
from fleet_steps import exchange_key, register_fleet_device

from libs.servers.mosquitto import EmbeddedMosquitto
from services.instance.devices import DEVICES_LOCK
from services.instance.housekeeping import _forget_abandoned
from support import eventually

pytestmark = pytest.mark.slow

WAITING_FOR_THE_LOCK = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"


async def test_a_device_completing_its_key_exchange_as_housekeeping_removes_it_stays(
    postgres_server_url: str, broker: EmbeddedMosquitto
) -> None:
    async with running_instance(postgres_server_url, broker) as inst:
        late = await register_fleet_device(inst.url, KEY)
        gone = await register_fleet_device(inst.url, KEY)
        await inst.db.execute(
            "UPDATE devices SET created_at = created_at - interval '25 hours' "
            "WHERE device_id = ANY($1)",
            [late["id"], gone["id"]],
        )
        holder = await inst.state.pool().acquire()
        try:
            held = holder.transaction()
            await held.start()
            await holder.execute(DEVICES_LOCK)
            async with inst.state.pool().acquire() as conn:
                sweep = asyncio.create_task(
                    _forget_abandoned(conn, inst.state.devices, inst.state.ingest)
                )
                await eventually(
                    lambda: inst.db.fetchval(WAITING_FOR_THE_LOCK),
                    lambda waiting: waiting >= 1,
                    what="housekeeping waiting for the devices' lock",
                )
                exchanged = await exchange_key(inst.url, late["uuid"], late["deviceApiKey"])
                assert exchanged.status_code == 200, exchanged.text
                await held.commit()
                await sweep
        finally:
            await inst.state.pool().release(holder)

        kept = await inst.db.fetchrow(
            "SELECT deleted_at, key_exchanged_at FROM devices WHERE device_id = $1", late["id"]
        )
        assert kept["deleted_at"] is None
        assert kept["key_exchanged_at"] is not None
        assert await inst.db.fetchval(
            "SELECT deleted_at IS NOT NULL FROM devices WHERE device_id = $1", gone["id"]
        )
        # Its broker client is still there: it can connect.
        async with inst.state.devices.broker_admin() as dynsec:
            assert await dynsec.get_client(late["mqtt"]["username"]) is not None
            assert await dynsec.get_client(gone["mqtt"]["username"]) is None
        # The removed one's key exchange is refused: it registers again.
        refused = await exchange_key(inst.url, gone["uuid"], gone["deviceApiKey"])
        assert refused.status_code == 401, refused.text
