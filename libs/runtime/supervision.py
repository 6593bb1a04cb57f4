"""One supervisor for every long-lived task of a process: nothing dies silently.

A task (a projection runner, a reactor, a scheduler, a relay, a job worker) is started through
``Supervisor.spawn``. When it raises, the supervisor logs the traceback, counts the restart
(``iotistic_task_restarts_total``) and starts it again after a jittered, capped backoff; the
backoff starts over once the task has run well for a while. A task that returns while the
process is not stopping is a bug of the same kind and is restarted the same way: a task never
decides alone that it is done with the world.

Each task's state is shown by ``health``, which readiness reports: a task waiting to be
restarted is not healthy, and neither is one that said how often it makes progress
(``stuck_after``) and has not beaten (``beat``) for that long: a pass hung on a dead socket is
as broken as a crashed one.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import stamina
from prometheus_client import CollectorRegistry, Counter

from libs.observability.telemetry import serving

log = logging.getLogger(__name__)

# The task the running coroutine belongs to, so the code it calls can beat without being
# handed the task (``beat()``).
_current: contextvars.ContextVar[SupervisedTask | None] = contextvars.ContextVar(
    "supervised_task", default=None
)


class TaskState(enum.Enum):
    """Where a supervised task is."""

    RUNNING = "running"
    RESTARTING = "restarting"  # it crashed; waiting out its backoff before the next start
    STOPPED = "stopped"


@dataclass(frozen=True)
class Backoff:
    """Jittered exponential backoff: ``initial`` doubled per crash in a row, at most ``cap``,
    times a random factor in [1 - jitter, 1]; a run of ``healthy_after`` seconds forgets the
    crashes before it."""

    initial: float = 0.5
    cap: float = 30.0
    jitter: float = 0.5
    healthy_after: float = 60.0

    def delay(self, crashes_in_a_row: int) -> float:
        """Seconds to wait before the next start after that many crashes in a row."""
        exponent = min(max(crashes_in_a_row - 1, 0), 30)
        raw = min(self.cap, self.initial * 2.0**exponent)
        return raw * (1 - self.jitter * random.random())  # noqa: S311 (spreads restarts out)


@dataclass
class SupervisedTask:
    """A task's state as its supervisor sees it."""

    name: str
    stuck_after: float | None = None
    state: TaskState = TaskState.RUNNING
    restarts: int = 0
    last_error: str | None = None
    last_beat: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None

    def beat(self) -> None:
        """The task made progress (a scheduler finished a pass, a worker polled)."""
        self.last_beat = time.monotonic()

    def stuck_for(self) -> float | None:
        """Seconds past its bound since the task last beat, or None when it is not stuck."""
        if self.stuck_after is None or self.state is not TaskState.RUNNING:
            return None
        silent = time.monotonic() - self.last_beat
        return silent if silent > self.stuck_after else None

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether the task is healthy, and what readiness shows of it."""
        detail: dict[str, Any] = {"state": self.state.value, "restarts": self.restarts}
        ok = self.state is TaskState.RUNNING
        if self.last_error is not None:
            detail["last_error"] = self.last_error
        stuck = self.stuck_for()
        if stuck is not None:
            ok = False
            detail["stuck_seconds"] = round(stuck, 1)
        return ok, detail


def retrying(
    on: tuple[type[BaseException], ...],
    *,
    wait_initial: float = 0.5,
    wait_max: float = 5.0,
) -> AsyncIterator[stamina.Attempt]:
    """Attempts of one transient step until it works (stamina: jittered exponential backoff
    from ``wait_initial`` to ``wait_max``, no limit on tries or time)::

        async for attempt in retrying(CONNECTION_ERRORS):
            with attempt:
                await connect()
    """
    return stamina.retry_context(
        on=lambda exc: isinstance(exc, on),
        attempts=None,
        timeout=None,
        wait_initial=wait_initial,
        wait_max=wait_max,
    )


async def then_idle(step: Awaitable[None]) -> None:
    """Run a start-up step under supervision (restarted if it crashes), then stay done."""
    await step
    await asyncio.Event().wait()


def restart_counter(registry: CollectorRegistry) -> Counter:
    """The counter of restarts every supervisor of one registry shares."""
    return Counter(
        "iotistic_task_restarts_total",
        "Long-lived tasks restarted by their supervisor after a crash or an early end",
        ("owner", "task"),
        registry=registry,
    )


def beat() -> None:
    """Mark progress of the supervised task this code runs in (nothing outside one)."""
    task = _current.get()
    if task is not None:
        task.beat()


@dataclass(frozen=True)
class Worker:
    """A long-lived task a service declares: its name, how to start it, and how long it may go
    without beating (``beat``) before readiness calls it stuck (None: it does not beat)."""

    name: str
    start: Callable[[], Awaitable[None]]
    stuck_after: float | None = None


class Supervisor:
    """Starts, restarts and stops a process's long-lived tasks, and reports on them."""

    def __init__(
        self,
        owner: str,
        restarts: Counter | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        """``owner`` names the service (or process) in logs; ``restarts`` (labels owner, task)
        counts restarts, one counter shared by every supervisor of a registry."""
        self.owner = owner
        self.backoff = backoff or Backoff()
        self.tasks: dict[str, SupervisedTask] = {}
        self._stopping = False
        self._restarts = restarts

    def spawn(
        self,
        name: str,
        start: Callable[[], Awaitable[None]],
        *,
        stuck_after: float | None = None,
    ) -> SupervisedTask:
        """Run ``start()`` under supervision as task ``name`` (unique per supervisor)."""
        if name in self.tasks:
            raise ValueError(f"{self.owner}: a task named {name!r} is supervised already")
        supervised = SupervisedTask(name=name, stuck_after=stuck_after)
        self.tasks[name] = supervised
        if self._restarts is not None:
            # The task's series exists at 0 from its start, so increase() counts its first
            # restart, and a dashboard shows the tasks that never restarted.
            self._restarts.labels(self.owner, name)
        supervised.task = asyncio.create_task(
            self._keep(supervised, start), name=f"{self.owner}.{name}"
        )
        return supervised

    async def _keep(self, supervised: SupervisedTask, start: Callable[[], Awaitable[None]]) -> None:
        _current.set(supervised)
        serving(self.owner)  # the spans this task makes are its service's
        crashes_in_a_row = 0
        while not self._stopping:
            supervised.state = TaskState.RUNNING
            supervised.beat()
            started = time.monotonic()
            try:
                await start()
            except asyncio.CancelledError as exc:
                current = asyncio.current_task()
                if self._stopping or (current is not None and current.cancelling()):
                    raise
                # Not asked for: a library let a cancellation of its own escape. That is a
                # crash like any other, not a reason to end quietly.
                supervised.last_error = f"CancelledError (not asked for): {exc}"
                log.error("%s: task %s ended by a stray cancellation", self.owner, supervised.name)
            except Exception as exc:
                if self._stopping:
                    break
                supervised.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("%s: task %s crashed; restarting it", self.owner, supervised.name)
            else:
                if self._stopping:
                    break
                supervised.last_error = "ended while the process was running"
                log.error("%s: task %s ended on its own; restarting", self.owner, supervised.name)
            if time.monotonic() - started >= self.backoff.healthy_after:
                crashes_in_a_row = 0
            crashes_in_a_row += 1
            supervised.restarts += 1
            if self._restarts is not None:
                self._restarts.labels(self.owner, supervised.name).inc()
            supervised.state = TaskState.RESTARTING
            await asyncio.sleep(self.backoff.delay(crashes_in_a_row))
        supervised.state = TaskState.STOPPED

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Every task's state; healthy when each task is running and not stuck."""
        detail: dict[str, Any] = {}
        ok = True
        for name, supervised in self.tasks.items():
            task_ok, detail[name] = supervised.health()
            ok = ok and task_ok
        return ok, detail

    async def stop(self, timeout: float, before: Callable[[], None] | None = None) -> None:
        """Stop restarting; give the tasks ``timeout`` seconds to end (``before`` asks them
        to), then cancel what is left."""
        self._stopping = True
        if before is not None:
            before()
        tasks = [s.task for s in self.tasks.values() if s.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for supervised in self.tasks.values():
            supervised.state = TaskState.STOPPED

    def cancel(self, name: str) -> None:
        """Cancel one task now (a worker that holds nothing in hand)."""
        supervised = self.tasks[name]
        if supervised.task is not None:
            supervised.task.cancel()
