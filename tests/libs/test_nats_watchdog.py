"""The embedded NATS after its disk was full: JetStream keeps refusing every append once the
space is freed (a critical write error stays on the stream) until nats-server restarts. `up`
runs a watchdog that restarts it then, as a liveness probe on /healthz would restart a pod.
Issue 12 found the platform stuck for good after a full disk was freed.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.js import api

from libs.servers.keeper import NatsWatchdog
from libs.servers.nats import EmbeddedNats
from support import eventually, fill


async def publish(js: nats.js.JetStreamContext) -> bool:
    try:
        await js.publish("t.e", b"x" * 1000, timeout=1)
    except (nats.errors.Error, TimeoutError):
        return False
    return True


async def test_a_nats_stuck_after_a_full_disk_is_restarted_once_there_is_room(
    full_disk: Path,
) -> None:
    server = EmbeddedNats(full_disk / "nats")
    server.start()
    watching: asyncio.Task[None] | None = None
    try:
        nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        js = nc.jetstream()
        await js.add_stream(api.StreamConfig(name="T", subjects=["t.>"]))
        assert await publish(js)
        fill(full_disk)
        while await publish(js):
            pass  # until the disk is full and the stream takes a write error
        watchdog = NatsWatchdog(server, after=0.5, every=0.1)
        assert watchdog.write_error() is not None
        watching = asyncio.create_task(watchdog.run())
        # Full: restarting would not help, so it waits.
        await asyncio.sleep(1.5)
        assert watchdog.restarts == 0
        (full_disk / "filler").unlink()
        # Room again, but the stream still refuses: the watchdog restarts the server.
        await eventually(lambda: asyncio.sleep(0, watchdog.restarts), bool, what="a restart")
        assert await eventually(lambda: publish(js), bool, what="appends taken again")
        assert watchdog.write_error() is None
        await nc.close()
    finally:
        if watching is not None:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
        server.stop()


def test_a_healthy_nats_has_no_write_error(tmp_path: Path) -> None:
    with EmbeddedNats(tmp_path / "nats") as server:
        watchdog = NatsWatchdog(server)
        assert watchdog.write_error() is None
        assert watchdog.disk_has_room()


pytestmark = pytest.mark.slow
