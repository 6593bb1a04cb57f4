"""The broker stalls (SIGSTOP: its port still takes connections, nothing answers) while fleet
devices register and a device is deleted. Every registration is answered within a bound:
502 (after the broker administration's timeout, not one registration after another behind
the devices' lock) or 503 with Retry-After (no turn soon); it keeps nothing and counts no use
of the key. The deletion is refused and the device stays. Once the broker goes on, the same
registrations succeed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable
from typing import Any

import pytest
from fleet_fault_steps import KEY, running_instance
from fleet_steps import (
    new_api_key,
    new_uuid,
    post_registration,
    register_fleet_device,
    registration_body,
)

from libs.servers.mosquitto import EmbeddedMosquitto
from services.instance.devices import BrokerUnavailable
from support import eventually

pytestmark = pytest.mark.slow

STALLED_REGISTRATIONS = 8
# The broker administration gives up on a silent broker after 5 s; registrations take turns
# two at a time (registration.AT_ONCE), and one that gets no turn within 8 s is answered 503
# (registration.TURN_WAIT): every one is answered within about two timeouts, not one
# timeout after another for each.
BOUND = 15.0


async def test_a_stalled_broker_answers_every_registration_502_within_a_bound(
    postgres_server_url: str, broker: EmbeddedMosquitto
) -> None:
    async with running_instance(postgres_server_url, broker) as inst:
        kept = await register_fleet_device(inst.url, KEY)
        uses = await inst.db.fetchval("SELECT uses FROM provisioning_keys")
        bodies = [
            registration_body(new_uuid(), new_api_key()) for _ in range(STALLED_REGISTRATIONS)
        ]
        pid = broker.pid
        assert pid is not None

        async def timed(call: Awaitable[Any]) -> tuple[Any, float]:
            started = time.monotonic()
            try:
                result = await call
            except BrokerUnavailable as exc:
                result = exc
            return result, time.monotonic() - started

        async def delete() -> bool:
            async with inst.state.pool().acquire() as conn:
                return await inst.state.devices.remove(conn, kept["id"])

        os.kill(pid, signal.SIGSTOP)
        try:
            results = await asyncio.gather(
                *(timed(post_registration(inst.url, KEY, body)) for body in bodies),
                timed(delete()),
            )
        finally:
            os.kill(pid, signal.SIGCONT)
        took = [round(t, 1) for _, t in results]
        print(f"\nanswered after {took} s")
        *registered, (deleted, _) = results
        assert {r.status_code for r, _ in registered} <= {502, 503}
        assert all(r.headers.get("Retry-After") for r, _ in registered if r.status_code == 503)
        assert isinstance(deleted, BrokerUnavailable)
        assert max(took) < BOUND, took
        assert await inst.db.fetchval("SELECT count(*) FROM devices WHERE deleted_at IS NULL") == 1
        assert await inst.db.fetchval("SELECT uses FROM provisioning_keys") == uses

        await eventually(
            lambda: post_registration(inst.url, KEY, bodies[0]),
            lambda r: r.status_code == 200,
            what="a registration once the broker goes on",
        )
        for body in bodies[1:]:
            again = await post_registration(inst.url, KEY, body)
            assert again.status_code == 200, again.text
