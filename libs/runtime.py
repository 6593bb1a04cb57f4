"""Running services: what a service is made of, and the process that hosts one or all of them.

A service is declared once (``ServiceDefinition``: its schema's migrations, its projections, its
routes). A process (``Platform``) hosts one service in production or every control-plane service
in the embedded default; the service code is the same either way, only the wiring differs. All
services in a process share one NATS connection but each has its own pool, schema and consumers,
and they talk to each other only through the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import asyncpg
import msgspec
import nats
import nats.errors
from litestar.types import ControllerRouterHandler
from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry

from libs.config import ServiceSettings, load_settings
from libs.db import CONNECTION_ERRORS, create_pool, migrate, ping, service_migrations
from libs.eventstore import EventStore
from libs.http import DomainError
from libs.metrics import ProjectionMetrics
from libs.projections import (
    NATS_ERRORS,
    Projection,
    ProjectionRunner,
    RunnerConfig,
    RunnerState,
)

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
    # Long-running tasks of the service besides its consumers (schedulers, job workers).
    workers: Callable[[ServiceRuntime], Sequence[Callable[[], Awaitable[None]]]] = lambda _: ()
    # The service's own settings type (a ServiceSettings with more fields), read once at start.
    settings_type: type[ServiceSettings] = ServiceSettings

    @property
    def schema(self) -> str:
        """The Postgres schema this service owns."""
        return self.name


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
    _shared: dict[str, Any] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _workers: list[asyncio.Task[None]] = field(default_factory=list)

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
        delay = 0.5
        while self.pool is None:
            try:
                pool = await create_pool(
                    self.settings.database_url,
                    self.definition.schema,
                    min_size=self.settings.db_pool_min,
                    max_size=self.settings.db_pool_max,
                )
                async with pool.acquire() as conn:
                    await migrate(
                        conn,
                        self.definition.schema,
                        service_migrations(self.definition.migrations_package),
                    )
                self.pool = pool
            except CONNECTION_ERRORS as exc:
                self.last_error = f"database: {exc}"
                log.warning("%s: database not reachable (%s); retrying", self.name, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.last_error = None
        config = RunnerConfig(
            batch_size=self.settings.projection_batch_size,
            ack_wait_seconds=float(self.settings.projection_ack_wait_seconds),
            max_attempts=self.settings.projection_max_attempts,
        )
        consumers = [*self.definition.projections, *self.definition.reactors(self)]
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
            self._spawn(runner.run(), f"{self.name}.{projection.name}")
        for worker in self.definition.workers(self):
            self._workers.append(self._spawn(worker(), f"{self.name}.worker"))
        self.started = True

    def _spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                # A crashed worker is a bug; say so loudly, readiness shows it as not attached.
                log.exception("%s crashed", name)
                raise

        task = asyncio.create_task(guarded(), name=name)
        self._tasks.append(task)
        return task

    async def stop(self) -> None:
        """Stop the runners and workers, then close the pool."""
        for runner in self.runners:
            runner.stop()
        for worker in self._workers:
            worker.cancel()  # workers hold no event in hand; runners finish theirs
        if self._tasks:
            # Workers may have children to stop (the local backend's instances): give them
            # time before cancelling what is left.
            _, pending = await asyncio.wait(self._tasks, timeout=STOP_SECONDS)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self.pool is not None:
            with contextlib.suppress(*CONNECTION_ERRORS, asyncpg.PostgresError):
                await asyncio.wait_for(self.pool.close(), timeout=5)

    async def readiness(self, nats_connected: bool) -> tuple[bool, dict[str, Any]]:
        """Ready = database answers, consumers attached, projections within the lag bound."""
        detail: dict[str, Any] = {}
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
        return all(ok for ok, _ in checks), detail

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
        return ok, entry


class ServiceUnavailable(DomainError):
    """A dependency of the service (database, log) is not reachable right now: 503."""

    status_code = 503
    code = "unavailable"


@dataclass
class Platform:
    """A process hosting one or more services over one NATS connection."""

    settings: ServiceSettings
    definitions: Sequence[ServiceDefinition]
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    nc: NatsClient | None = None
    store: EventStore | None = None
    services: dict[str, ServiceRuntime] = field(default_factory=dict)
    _starter: asyncio.Task[None] | None = None

    # Each service's own settings where it has more than the common ones.
    service_settings: Mapping[str, ServiceSettings] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.metrics = ProjectionMetrics(self.registry)
        for definition in self.definitions:
            self.services[definition.name] = ServiceRuntime(
                definition=definition,
                settings=self.service_settings.get(definition.name, self.settings),
                metrics=self.metrics,
                registry=self.registry,
            )

    @classmethod
    def from_settings(
        cls, settings: ServiceSettings, definitions: Sequence[ServiceDefinition], **extra: object
    ) -> Platform:
        """A platform from common settings plus the services' own (``extra``, by field name)."""
        common = msgspec.structs.asdict(settings)
        own = {
            d.name: msgspec.convert(
                {
                    **common,
                    **{k: v for k, v in extra.items() if k in d.settings_type.__struct_fields__},
                },
                d.settings_type,
            )
            for d in definitions
        }
        return cls(settings=settings, definitions=definitions, service_settings=own)

    @classmethod
    def from_environ(
        cls, definitions: Sequence[ServiceDefinition], environ: Mapping[str, str]
    ) -> Platform:
        """A platform whose common and per-service settings come from ``environ``.

        Raises ``ConfigError`` naming the first bad variable of any hosted service.
        """
        return cls(
            settings=load_settings(ServiceSettings, environ),
            definitions=definitions,
            service_settings={d.name: load_settings(d.settings_type, environ) for d in definitions},
        )

    def runtime_of(self, name: str) -> ServiceRuntime:
        """The runtime of a hosted service."""
        return self.services[name]

    async def start(self) -> None:
        """Begin connecting in the background; HTTP answers (not ready) meanwhile."""
        self._starter = asyncio.create_task(self._connect_and_start(), name="platform.start")

    async def wait_started(self, timeout: float = 60.0) -> None:
        """Wait until every service is connected and consuming (for tools and tests)."""
        if self._starter is None:
            raise RuntimeError("platform not started")
        await asyncio.wait_for(asyncio.shield(self._starter), timeout)

    async def _connect_and_start(self) -> None:
        delay = 0.5
        while self.nc is None:
            try:
                self.nc = await connect_nats(self.settings.nats_url)
            except NATS_ERRORS as exc:
                log.warning("NATS not reachable at start (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        store = EventStore(self.nc.jetstream(), self.settings)
        while True:
            try:
                await store.ensure_stream()
                break
            except NATS_ERRORS as exc:
                log.warning("could not declare the event stream (%s); retrying", exc)
                await asyncio.sleep(delay)
        self.store = store
        await asyncio.gather(*(s.start(store) for s in self.services.values()))

    async def stop(self) -> None:
        """Stop every service, then drain the NATS connection."""
        if self._starter is not None and not self._starter.done():
            self._starter.cancel()
            await asyncio.gather(self._starter, return_exceptions=True)
        await asyncio.gather(*(s.stop() for s in self.services.values()))
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(*NATS_ERRORS):
                await asyncio.wait_for(self.nc.drain(), timeout=5)

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Every hosted service's readiness, and the NATS connection's."""
        detail: dict[str, Any] = {}
        nats_ok = self.nc is not None and self.nc.is_connected
        detail["nats"] = {"ok": nats_ok}
        ok = nats_ok
        results = await asyncio.gather(
            *(runtime.readiness(nats_ok) for runtime in self.services.values())
        )
        services: dict[str, Any] = {}
        for name, (ready, state) in zip(self.services, results, strict=True):
            services[name] = {"ready": ready, **state}
            ok = ok and ready
        detail["services"] = services
        return ok, detail


async def connect_nats(url: str, name: str = "iotistic", attempts: int = 3) -> NatsClient:
    """A NATS connection that, once made, reconnects forever.

    The first connection is tried ``attempts`` times per server and then fails with a NATS
    error, so a caller (the platform's start loop, a CLI command) can report it instead of
    hanging silently.
    """
    servers = [u.strip() for u in url.split(",") if u.strip()]
    client_ref: list[NatsClient] = []

    async def on_error(exc: Exception) -> None:
        log.debug("nats: %s", exc)

    async def on_disconnected() -> None:
        # Closing on purpose also "disconnects"; only an unplanned loss is worth a warning.
        if client_ref and (client_ref[0].is_closed or client_ref[0].is_draining):
            return
        log.warning("nats: disconnected")

    async def on_reconnected() -> None:
        log.info("nats: reconnected")

    client = await nats.connect(
        servers=servers,
        name=name,
        allow_reconnect=True,
        max_reconnect_attempts=attempts,
        reconnect_time_wait=1,
        connect_timeout=2,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
    )
    # nats-py reads this option on every reconnect: from now on, never give up.
    client.options["max_reconnect_attempts"] = -1
    client_ref.append(client)
    return client
