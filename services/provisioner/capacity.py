"""How many instances the platform can hold, how many it holds, and telling whoever needs to know.

The backend measures its capacity (``Backend.capacity``); the queue compares it with the
instances running or starting whenever it claims a job (``claim_next_job``). This module keeps
the measurement fresh for the queue, shows it to the operator (``/health/ready``, ``/metrics``)
and records on the log when the platform becomes full or has room again, or the number it can
hold changes (``InstanceCapacityChanged``), for signup to tell a new trial that it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from contracts import InstanceCapacityChanged
from libs.eventlog.errors import ConcurrencyConflict
from libs.eventlog.store import Appended, EventStore
from libs.runtime.scheduling import PASSING
from services.provisioner.backends.base import Backend, Capacity
from services.provisioner.metrics import QueueMetrics
from services.provisioner.queue import instances_held, waiting_for_capacity

log = logging.getLogger(__name__)

# The subject key of the platform's capacity events: they are about no customer.
PLATFORM = "platform"
# What the log records of capacity is whether the platform is full (signup tells a trial that
# waits): the limit itself moves with the memory bound all the time, and is shown live in
# /health/ready and /metrics instead.


@dataclass(frozen=True)
class CapacityState:
    """The capacity last measured, and the queue's counts then."""

    capacity: Capacity
    running: int
    waiting: int

    @property
    def full(self) -> bool:
        """Whether a new instance would have to wait."""
        return self.capacity.limit is not None and self.running >= self.capacity.limit

    def readiness(self) -> dict[str, Any]:
        """What ``/health/ready`` shows: never a reason to be unready (full is not unhealthy)."""
        return {
            "running": self.running,
            "limit": self.capacity.limit,
            "limited_by": self.capacity.limited_by,
            "full": self.full,
            "waiting": self.waiting,
            "bounds": self.capacity.bounds,
        }


def worth_recording(previous: asyncpg.Record | None, now: CapacityState) -> bool:
    """Whether ``now`` is news against the last recorded change: the platform filled up or
    has room again. Before any record, not being full is what everyone assumes already."""
    if previous is None:
        return now.full
    full: bool = previous["full"]
    return full != now.full


async def record_capacity_change(
    conn: asyncpg.Connection, store: EventStore, state: CapacityState
) -> Appended | None:
    """Append ``InstanceCapacityChanged`` if the last one recorded says otherwise.

    The last one is read from the ``capacity`` projection, which may lag the log; the append
    expects the sequence that projection applied last, and its event id derives from it:
    replicas that notice the same change append it once, and one that compared with an older
    change than the log's last loses the race and compares again on its next pass."""
    previous = await conn.fetchrow('SELECT seq, "full", capacity FROM capacity_recorded')
    if not worth_recording(previous, state):
        return None
    seq = 0 if previous is None else int(previous["seq"])
    change = InstanceCapacityChanged(
        running=state.running,
        capacity=state.capacity.limit,
        limited_by=state.capacity.limited_by,
        full=state.full,
    )
    try:
        return await store.publish(
            change,
            customer_id=None,
            key=PLATFORM,
            expected_last_subject_seq=seq,
            event_id=f"instance-capacity-after-{seq}-{change.full}-{change.capacity}",
        )
    except ConcurrencyConflict:
        log.info("capacity: a newer change is on the log than applied here; next pass")
        return None


@dataclass
class CapacityWatch:
    """Keeps the backend's capacity measured, the gauges current and the log told."""

    backend: Backend
    pool: Callable[[], asyncpg.Pool]
    events: Callable[[], EventStore]
    metrics: QueueMetrics
    every: float
    state: CapacityState | None = None
    _measured: tuple[float, Capacity] | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    async def limit(self) -> int | None:
        """The instances the backend can hold, measured at most ``every`` seconds ago; the
        queue asks before each claim."""
        return (await self.measure()).limit

    async def measure(self, fresh: bool = False) -> Capacity:
        """The backend's capacity, measured again when older than ``every`` (or ``fresh``).

        A measurement that fails keeps the last one (none yet: no limit), logged: the queue
        asks before every claim, and a broken measurement must not stop deletes and updates."""
        async with self._lock:
            now = time.monotonic()
            if fresh or self._measured is None or now - self._measured[0] >= self.every:
                try:
                    measured = await self.backend.capacity()
                except Exception:
                    log.exception("capacity: measuring the %s backend failed", self.backend.name)
                    measured = self._measured[1] if self._measured else Capacity(limit=None)
                self._measured = (now, measured)
            return self._measured[1]

    def wake(self) -> None:
        """Look again now (an instance started or was removed)."""
        self._wake.set()

    async def refresh(self) -> CapacityState:
        """Measure, count, show and (on a change) record the platform's capacity."""
        capacity = await self.measure(fresh=True)
        async with self.pool().acquire() as conn:
            running = await instances_held(conn)
            waiting = await waiting_for_capacity(conn)
            self.state = CapacityState(capacity=capacity, running=running, waiting=waiting)
            self.metrics.show_capacity(running, capacity.limit, waiting)
            await record_capacity_change(conn, self.events(), self.state)
        return self.state

    async def run(self) -> None:
        """Refresh every ``every`` seconds, or when woken; failures that pass are waited out."""
        while True:
            self._wake.clear()
            try:
                await self.refresh()
            except PASSING as exc:
                log.warning("capacity: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.every)

    def readiness(self) -> dict[str, Any]:
        """The ``capacity`` entry of the provisioner's readiness."""
        if self.state is None:
            return {"running": None, "limit": None, "limited_by": None, "measured": False}
        return self.state.readiness()
