"""A service: what it is made of (``ServiceDefinition``) and its live parts in a process.

A service is declared once: its schema's migrations, its projections and reactors, its routes,
its workers and the events it owns. ``ServiceRuntime`` is that service running inside a process
(``libs/runtime/platform.py``): its pool on its own schema, one projection runner per consumer,
its workers under its supervisor, and its readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import asyncpg
from litestar.types import ControllerRouterHandler
from prometheus_client import CollectorRegistry, Counter

from contracts import Event
from libs.config import ServiceSettings
from libs.db.postgres import CONNECTION_ERRORS, create_pool, migrate, ping, service_migrations
from libs.eventlog.connection import NATS_ERRORS
from libs.eventlog.store import EventStore
from libs.http.errors import DomainError
from libs.observability.metrics import ProjectionMetrics
from libs.projections.apply import Projection
from libs.projections.runner import ProjectionRunner, RunnerConfig, RunnerState, durable_name
from libs.runtime.supervision import Supervisor, Worker, retrying

log = logging.getLogger(__name__)

S = TypeVar("S", bound=ServiceSettings)
STOP_SECONDS = 15.0
T = TypeVar("T")


@dataclass(frozen=True)
class ServiceDefinition:
    """What a service is: its name (and schema), migrations, projections and HTTP routes."""

    name: str
    migrations_package: str
    # Read models, rebuilt from the log by `iotistic replay`.
    projections: tuple[Projection, ...] = ()
    # Consumers that answer events with events of their own (issue a license when a customer
    # signs up). Checkpointed like projections, but never replayed: that would act twice.
    reactors: Callable[[ServiceRuntime], Sequence[Projection]] = lambda _: ()
    routes: Callable[[ServiceRuntime], Sequence[ControllerRouterHandler]] = lambda _: ()
    # Long-running tasks of the service besides its consumers (schedulers, job workers), each
    # started and restarted by the service's supervisor.
    workers: Callable[[ServiceRuntime], Sequence[Worker]] = lambda _: ()
    # The service's own settings type (a ServiceSettings with more fields), read once at start.
    settings_type: type[ServiceSettings] = ServiceSettings
    # The event types this service appends. It owns them: no other service may, and the bus
    # refuses this service any other (``libs/eventlog/bus_auth.py``).
    emits: tuple[type[Event], ...] = ()
    # The names of the consumers ``reactors`` makes. The bus lets a service consume only through
    # its projections and these, so a reactor must be named here (checked at start).
    reactor_names: tuple[str, ...] = ()
    # Short-lived consumers the service reads the log through for an answer (a customer's own
    # events, for their export), one read at a time per name; the bus lets it create these too.
    reader_names: tuple[str, ...] = ()
    # What else the service shows in its readiness (the provisioner's capacity, say), from
    # what it already knows: no I/O, and never a reason to be unready.
    readiness_detail: Callable[[ServiceRuntime], Mapping[str, Any]] = lambda _: {}

    @property
    def schema(self) -> str:
        """The Postgres schema this service owns."""
        return self.name

    @property
    def emitted_types(self) -> tuple[str, ...]:
        """The ``type`` of every event this service owns."""
        return tuple(event.TYPE for event in self.emits)

    @property
    def consumers(self) -> tuple[str, ...]:
        """The consumers this service may use: one per projection, reactor and reader."""
        names = (*(p.name for p in self.projections), *self.reactor_names, *self.reader_names)
        return tuple(durable_name(self.name, n) for n in names)


@dataclass
class ServiceRuntime:
    """One service's live parts inside a process: pool, runners, workers."""

    definition: ServiceDefinition
    settings: ServiceSettings
    metrics: ProjectionMetrics
    registry: CollectorRegistry
    store: EventStore | None = None
    pool: asyncpg.Pool | None = None
    runners: list[ProjectionRunner] = field(default_factory=list)
    started: bool = False
    last_error: str | None = None
    # Counts restarts of this service's tasks (shared by the services of a process).
    restarts: Counter | None = None
    _shared: dict[str, Any] = field(default_factory=dict)
    # Where each projection's checkpoint was last seen to move: (checkpoint, monotonic time).
    _progress: dict[str, tuple[int, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.supervisor = Supervisor(self.definition.name, self.restarts)

    @property
    def name(self) -> str:
        """The service's name."""
        return self.definition.name

    def db(self) -> asyncpg.Pool:
        """The service's pool; raises ``ServiceUnavailable`` until it has connected."""
        if self.pool is None:
            raise ServiceUnavailable(f"{self.name}: database not connected yet")
        return self.pool

    def shared(self, key: str, make: Callable[[], T]) -> T:
        """One object per service runtime, made on first use (a backend its workers and routes
        share, say)."""
        if key not in self._shared:
            self._shared[key] = make()
        return cast(T, self._shared[key])

    def settings_as(self, cls: type[S]) -> S:
        """This service's settings as its own settings type."""
        if not isinstance(self.settings, cls):
            raise TypeError(f"{self.name}: settings are {type(self.settings).__name__}, not {cls}")
        return self.settings

    def events(self) -> EventStore:
        """The event log; raises ``ServiceUnavailable`` until NATS has connected."""
        if self.store is None:
            raise ServiceUnavailable(f"{self.name}: event log not connected yet")
        return self.store

    async def start(self, store: EventStore) -> None:
        """Connect, migrate and start consuming; retries until Postgres answers."""
        self.store = store
        # A database away is waited out; a migration that fails (a bug, a schema changed by
        # hand) is retried too, and readiness names it meanwhile: never "connecting".
        async for attempt in retrying((Exception,), wait_max=30.0):
            with attempt:
                self.pool = await self._connect_and_migrate()
        self.last_error = None
        config = RunnerConfig(
            batch_size=self.settings.projection_batch_size,
            ack_wait_seconds=float(self.settings.projection_ack_wait_seconds),
            max_attempts=self.settings.projection_max_attempts,
        )
        reactors = self.definition.reactors(self)
        undeclared = {r.name for r in reactors} - set(self.definition.reactor_names)
        if undeclared:
            # The bus would refuse their consumers; say why here rather than time out there.
            raise RuntimeError(f"{self.name}: reactors not in reactor_names: {sorted(undeclared)}")
        consumers = [*self.definition.projections, *reactors]
        for projection in consumers:
            runner = ProjectionRunner(
                service=self.name,
                projection=projection,
                pool=self.pool,
                dsn=self.settings.database_url,
                schema=self.definition.schema,
                store=self.store,
                metrics=self.metrics,
                config=config,
            )
            self.runners.append(runner)
            self.supervisor.spawn(f"projection:{projection.name}", runner.run)
        for worker in self.definition.workers(self):
            self.supervisor.spawn(worker.name, worker.start, stuck_after=worker.stuck_after)
        self.started = True

    async def _connect_and_migrate(self) -> asyncpg.Pool:
        """A pool on the service's schema, migrated; ``last_error`` says why not."""
        try:
            pool = await create_pool(
                self.settings.database_url,
                self.definition.schema,
                min_size=self.settings.db_pool_min,
                max_size=self.settings.db_pool_max,
            )
            try:
                async with pool.acquire() as conn:
                    await migrate(
                        conn,
                        self.definition.schema,
                        service_migrations(self.definition.migrations_package),
                    )
            except BaseException:
                await _close_quietly(pool)
                raise
        except CONNECTION_ERRORS as exc:
            self.last_error = f"database: {exc}"
            log.warning("%s: database not reachable (%s); retrying", self.name, exc)
            raise
        except Exception as exc:
            self.last_error = f"migrations: {type(exc).__name__}: {exc}"
            log.exception("%s: migrations failed; retrying", self.name)
            raise
        return pool

    async def stop(self) -> None:
        """Stop the runners and workers, then close the pool."""

        def ask_to_stop() -> None:
            for runner in self.runners:
                runner.stop()  # runners finish the event in hand
            for name in self.supervisor.tasks:
                if not name.startswith("projection:"):
                    self.supervisor.cancel(name)  # workers hold no event in hand

        # Workers may have children to stop (the local backend's instances): give them time
        # before cancelling what is left.
        await self.supervisor.stop(STOP_SECONDS, before=ask_to_stop)
        if self.pool is not None:
            with contextlib.suppress(*CONNECTION_ERRORS, asyncpg.PostgresError):
                await asyncio.wait_for(self.pool.close(), timeout=5)

    async def readiness(self, nats_connected: bool) -> tuple[bool, dict[str, Any]]:
        """Ready = database answers, consumers attached, projections within the lag bound."""
        detail: dict[str, Any] = dict(self.definition.readiness_detail(self))
        if self.pool is None:
            detail["database"] = {"ok": False, "error": self.last_error or "connecting"}
            return False, detail
        checks = await asyncio.gather(
            self._database_ok(),
            *(self._projection_state(r, nats_connected) for r in self.runners),
        )
        detail["database"] = checks[0][1]
        detail["projections"] = {
            r.projection.name: c[1] for r, c in zip(self.runners, checks[1:], strict=True)
        }
        tasks_ok, detail["tasks"] = self.supervisor.health()
        refusing = self.store.refusing_writes() if self.store is not None else None
        detail["log"] = {"ok": refusing is None}
        if refusing is not None:
            detail["log"]["error"] = f"the log refuses this service's appends ({refusing})"
        return refusing is None and tasks_ok and all(ok for ok, _ in checks), detail

    async def _database_ok(self) -> tuple[bool, dict[str, Any]]:
        try:
            await ping(self.db(), timeout=1.0)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            return False, {"ok": False, "error": type(exc).__name__}
        return True, {"ok": True}

    async def _projection_state(
        self, runner: ProjectionRunner, nats_connected: bool
    ) -> tuple[bool, dict[str, Any]]:
        state = runner.status.state
        entry: dict[str, Any] = {
            "state": state.value,
            "attached": runner.status.attached,
            "checkpoint": runner.status.checkpoint,
        }
        ok = state in (RunnerState.RUNNING, RunnerState.BLOCKED, RunnerState.STANDBY)
        if state is RunnerState.BLOCKED:
            # Parked, waiting for an operator: reported, and the service keeps serving.
            entry["blocked_at"] = runner.status.blocked_at
            entry["error"] = runner.status.last_error
        if not nats_connected:
            entry["lag"] = None
            return False, entry
        try:
            lag = await runner.lag()
        except NATS_ERRORS as exc:
            entry["lag"] = None
            entry.setdefault("error", f"consumer info: {type(exc).__name__}")
            return False, entry
        entry["lag"] = lag
        if state is not RunnerState.BLOCKED and lag > self.settings.projection_max_lag:
            ok = False
        stalled = self._stalled_for(runner, lag)
        if stalled is not None and state not in (RunnerState.BLOCKED, RunnerState.STANDBY):
            entry["stalled_seconds"] = round(stalled, 1)
            ok = False
        return ok, entry

    def _stalled_for(self, runner: ProjectionRunner, lag: int) -> float | None:
        """Seconds the projection has been behind without its checkpoint moving, past the
        bound; None when it is caught up, moving, or within the bound."""
        name, checkpoint, now = runner.projection.name, runner.status.checkpoint, time.monotonic()
        seen = self._progress.get(name)
        if lag == 0 or seen is None or seen[0] != checkpoint:
            self._progress[name] = (checkpoint, now)
            return None
        behind = now - seen[1]
        return behind if behind > self.settings.projection_stall_seconds else None


async def _close_quietly(pool: asyncpg.Pool) -> None:
    with contextlib.suppress(*CONNECTION_ERRORS, asyncpg.PostgresError):
        await asyncio.wait_for(pool.close(), timeout=5)


class ServiceUnavailable(DomainError):
    """A dependency of the service (database, log) is not reachable right now: 503, with
    ``Retry-After`` (seconds) so a client knows to come back."""

    status_code = 503
    code = "unavailable"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        """Answered with ``Retry-After: <retry_after>``."""
        super().__init__(message, headers={"Retry-After": str(retry_after)})
