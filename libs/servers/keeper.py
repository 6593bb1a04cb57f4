"""Keeping the embedded servers up: what a process supervisor or a liveness probe would do.

``ServerKeeper`` starts again each server that dies or stops answering, on its own ports over
its own data, with a backoff while it keeps failing, and says in readiness what is down.
``NatsWatchdog`` restarts an embedded NATS whose JetStream is stuck refusing writes after its
disk was full. ``iotistic up`` runs both beside the services.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from libs.servers.nats import EmbeddedNats
from libs.servers.process import ChildServer, EmbeddedServerError, run_blocking

log = logging.getLogger(__name__)


class NatsWatchdog:
    """Restarts an embedded NATS whose JetStream is stuck on a write error.

    When its disk fills up, nats-server marks the stream with a critical write error and keeps
    refusing every append after the space is freed, until it is restarted (its ``/healthz``
    says so meanwhile). What a process supervisor does for a NATS pod (a liveness probe on
    ``/healthz``), this does for the embedded one: once the write error has lasted
    ``after`` seconds and the store's file system has ``min_free_bytes`` free again, it stops
    nats-server gracefully and starts it on the same ports and data. Clients reconnect.
    """

    def __init__(
        self,
        server: EmbeddedNats,
        *,
        after: float = 20.0,
        every: float = 5.0,
        min_free_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        """Watch ``server`` every ``every`` seconds."""
        self.server = server
        self.after = after
        self.every = every
        self.min_free_bytes = min_free_bytes
        self.restarts = 0
        self._starting_failed = False

    def write_error(self) -> str | None:
        """JetStream's write error as ``/healthz`` states it, or None while there is none (a
        server that does not answer is its start's, stop's and keeper's business)."""
        answer = self.server.healthz()
        if answer is None or answer[0] == 200:
            return None
        return answer[1] if "write error" in answer[1] else None

    def disk_has_room(self) -> bool:
        """Whether the store's file system has room for JetStream to write again: a tenth of
        it free, or ``min_free_bytes``, whichever is less."""
        stats = os.statvfs(self.server.data_dir)
        total = stats.f_blocks * stats.f_frsize
        return stats.f_bavail * stats.f_frsize >= min(self.min_free_bytes, total // 10)

    async def _start_again(self) -> None:
        try:
            await run_blocking(self.server.start)
            self._starting_failed = False
        except EmbeddedServerError as exc:
            self._starting_failed = True
            log.error("nats-server did not start again (%s); trying again", exc)

    async def run(self) -> None:
        """Watch for ever; restart the server when its write error outlasts ``after``."""
        since: float | None = None
        while True:
            if self._starting_failed and not self.server.is_running:
                # A restart of ours that did not come up (recovery outlasting the start
                # timeout, say): keep trying, or NATS stays down for good.
                await self._start_again()
                await asyncio.sleep(self.every)
                continue
            error = await asyncio.to_thread(self.write_error)
            if error is None:
                since = None
            else:
                now = time.monotonic()
                since = since if since is not None else now
                if now - since >= self.after and self.disk_has_room():
                    log.error(
                        "nats-server: JetStream refuses writes (%s) and the disk has room "
                        "again; restarting it",
                        error[:300],
                    )
                    await run_blocking(self.server.stop)
                    self.restarts += 1
                    await self._start_again()
                    since = None
            await asyncio.sleep(self.every)


@dataclass
class KeptServer:
    """One server a ``ServerKeeper`` looks after, and what happened to it."""

    server: ChildServer
    state: str = "running"  # running | restarting
    restarts: int = 0
    last_exit: str | None = None
    error: str | None = None
    down_since: float | None = None
    # Since when the running server has not answered its probe (None while it answers).
    silent_since: float | None = None

    def view(self) -> dict[str, Any]:
        """What readiness shows of it."""
        state = self.state
        if state == "running" and self.silent_since is not None:
            state = "not answering"
        shown: dict[str, Any] = {"ok": state == "running", "state": state}
        if self.silent_since is not None:
            shown["silent_for_seconds"] = round(time.monotonic() - self.silent_since, 1)
        shown["pid"] = self.server.pid
        shown["restarts"] = self.restarts
        if self.last_exit is not None:
            shown["last_exit"] = self.last_exit
        if self.down_since is not None:
            shown["down_for_seconds"] = round(time.monotonic() - self.down_since, 1)
        if self.error is not None:
            shown["error"] = self.error
        return shown


@dataclass
class ServerKeeper:
    """What a process supervisor does for the embedded servers: each one that dies (killed,
    crashed) is reaped and started again on its own ports over its own data, with a backoff
    while it keeps failing. Its clients reconnect by themselves. ``readiness`` says what is
    down meanwhile. A server stopped on purpose (``stop()``) is left alone."""

    servers: Sequence[ChildServer]
    every: float = 0.5
    backoff_max: float = 10.0
    # A server that runs but has not answered its probe for this long is killed and started
    # again, as a liveness probe would have it (a stopped or wedged process).
    unresponsive_after: float = 30.0
    probe_every: float = 5.0
    kept: dict[str, KeptServer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kept = {server.name: KeptServer(server) for server in self.servers}

    async def run(self) -> None:
        """Watch for ever."""
        await asyncio.gather(*(self._keep(kept) for kept in self.kept.values()))

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether every server runs, and each one's state."""
        views = {name: kept.view() for name, kept in self.kept.items()}
        return all(v["ok"] for v in views.values()), views

    def _down(self, kept: KeptServer, why: str | None) -> None:
        kept.last_exit = why
        kept.silent_since = None
        kept.state = "restarting"
        kept.down_since = time.monotonic()
        log.error("%s ended (%s); starting it again", kept.server.name, why)

    async def _watch(self, kept: KeptServer) -> None:
        """Return once the running server has died or stopped answering."""
        server = kept.server
        next_probe = time.monotonic() + self.probe_every
        while True:
            if server.has_died:
                self._down(kept, server.exit_description())
                return
            now = time.monotonic()
            if server.is_running and now >= next_probe:
                next_probe = now + self.probe_every
                if await asyncio.to_thread(server.answers):
                    kept.silent_since = None
                else:
                    if kept.silent_since is None:
                        kept.silent_since = now
                    silent = now - kept.silent_since
                    if silent >= self.unresponsive_after:
                        log.error("%s has not answered for %.0f s; killing it", server.name, silent)
                        await run_blocking(server.kill)
                        self._down(kept, f"not answering for {silent:.0f} s; killed")
                        return
            await asyncio.sleep(self.every)

    async def _keep(self, kept: KeptServer) -> None:
        server = kept.server
        backoff = 0.5
        while True:
            if kept.state == "running":
                await self._watch(kept)
            kept.restarts += 1
            try:
                await run_blocking(server.start)
            except EmbeddedServerError as exc:
                kept.error = str(exc).splitlines()[0][:300]
                log.error(
                    "%s did not start again (%s); retrying in %.1f s",
                    server.name,
                    kept.error,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max)
                continue
            log.warning(
                "%s is back after %.1f s", server.name, time.monotonic() - (kept.down_since or 0)
            )
            kept.state, kept.error, kept.down_since = "running", None, None
            backoff = 0.5
