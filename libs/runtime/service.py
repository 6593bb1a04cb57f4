"""Running services: what a service is made of, and the process that hosts one or all of them.

A service is declared once (``ServiceDefinition``: its schema's migrations, its projections, its
routes). A process (``Platform``) hosts one service in production or every control-plane service in
the embedded default; the service code is the same either way, only the wiring differs. Each service
has its own NATS connection, as its own bus user (``libs/eventlog/bus_auth.py``: the server lets it
append only the events it owns), its own pool, schema and consumers, and the services talk to each
other only through the log, even inside one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncpg
import msgspec
import nats
import nats.errors
import nats.js.errors
from litestar.types import ControllerRouterHandler
from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry, Counter

from contracts import Event
from libs.config import ConfigError, EventLogSettings, ServiceSettings, load_settings
from libs.db.postgres import CONNECTION_ERRORS, create_pool, migrate, ping, service_migrations
from libs.eventlog.bus_auth import OPERATOR, BusAuthError, Credentials, inbox_prefix
from libs.eventlog.store import EventStore
from libs.http.app import DomainError
from libs.observability.metrics import ProjectionMetrics
from libs.projections.core import (
    NATS_ERRORS,
    Projection,
    ProjectionRunner,
    RunnerConfig,
    RunnerState,
    durable_name,
)
from libs.runtime.supervision import Supervisor, Worker, restart_counter, retrying

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
        """The durable consumers this service may use: one per projection and reactor."""
        names = (*(p.name for p in self.projections), *self.reactor_names)
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


@dataclass
class Platform:
    """A process hosting one or more services, each over its own NATS connection."""

    settings: ServiceSettings
    definitions: Sequence[ServiceDefinition]
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    services: dict[str, ServiceRuntime] = field(default_factory=dict)
    connections: dict[str, NatsClient] = field(default_factory=dict)
    # Why the event stream cannot be used yet (missing, unreachable); None once it is.
    stream_problem: str | None = "not checked yet"
    # Why the bus itself cannot be trusted (it lets anyone in); None while it asks who we are.
    bus_problem: str | None = None
    _starter: asyncio.Task[None] | None = None

    # Each service's own settings where it has more than the common ones.
    service_settings: Mapping[str, ServiceSettings] = field(default_factory=dict)
    # What else readiness depends on, by name (the servers `iotistic up` keeps running).
    checks: dict[str, Callable[[], tuple[bool, dict[str, Any]]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.metrics = ProjectionMetrics(self.registry)
        restarts = restart_counter(self.registry)
        for definition in self.definitions:
            self.services[definition.name] = ServiceRuntime(
                definition=definition,
                settings=self.service_settings.get(definition.name, self.settings),
                metrics=self.metrics,
                registry=self.registry,
                restarts=restarts,
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

        Raises ``ConfigError`` naming the first bad variable of any hosted service, or the
        bus password file a hosted service lacks.
        """
        platform = cls(
            settings=load_settings(ServiceSettings, environ),
            definitions=definitions,
            service_settings={d.name: load_settings(d.settings_type, environ) for d in definitions},
        )
        platform.check_credentials()
        return platform

    def check_credentials(self) -> None:
        """Every hosted service has its bus password (when the bus asks for credentials)."""
        folder = self.settings.nats_credentials_dir
        if folder is None:
            return
        credentials = Credentials(Path(folder))
        for name in self.services:
            try:
                credentials.password(name)
            except BusAuthError as exc:
                raise ConfigError(f"NATS_CREDENTIALS_DIR: {exc}") from None

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
        stores = dict(
            zip(
                self.services,
                await asyncio.gather(*(self._connect(name) for name in self.services)),
                strict=True,
            )
        )
        await self._declare_stream(next(iter(stores.values())))
        await asyncio.gather(*(s.start(stores[name]) for name, s in self.services.items()))

    async def _connect(self, service: str) -> EventStore:
        """The service's event store, over a connection as its own bus user."""
        async for attempt in retrying(NATS_ERRORS):
            with attempt:
                try:
                    nc = await connect_bus(self.settings, service, name=f"iotistic-{service}")
                except CredentialsRefused as exc:
                    self.bus_problem = f"{service}: {exc}"
                    log.error("%s; retrying", self.bus_problem)
                    raise
                except NATS_ERRORS as exc:
                    log.warning("%s: NATS not reachable at start (%s); retrying", service, exc)
                    raise
        self.connections[service] = nc
        if self.bus_problem and self.bus_problem.startswith(f"{service}: "):
            self.bus_problem = None  # its credentials were refused before; now they are taken
        if self.settings.nats_credentials_dir and not server_asks_for_credentials(nc):
            # Credentials were given, so the bus is meant to be closed; a server that lets
            # anyone in is a deployment mistake that readiness must show, not a detail.
            self.bus_problem = (
                "the NATS server asks for no credentials: anyone who reaches it can read and "
                "append events (give it the block `iotistic bus config` writes)"
            )
            log.error("%s: %s", service, self.bus_problem)
        return EventStore(nc.jetstream(), self.settings)

    async def _declare_stream(self, store: EventStore) -> None:
        """Bring the stream to its configured settings, or wait until an operator has made it.

        Only the operator may create or change streams. Where this process holds the operator's
        credentials (``iotistic up``, the tests) it declares the stream itself; a service of a
        production deployment waits, not ready, until ``iotistic events init`` has made it.
        """
        async for attempt in retrying(NATS_ERRORS):
            with attempt:
                try:
                    await self._declare_or_check(store)
                except nats.js.errors.NotFoundError:
                    self.stream_problem = (
                        f"event stream {store.stream} does not exist: "
                        "`iotistic events init` makes it"
                    )
                    log.warning("%s; retrying", self.stream_problem)
                    raise
                except NATS_ERRORS as exc:
                    self.stream_problem = f"event stream not reachable: {type(exc).__name__}"
                    log.warning("%s; retrying", self.stream_problem)
                    raise
        self.stream_problem = None

    async def _declare_or_check(self, store: EventStore) -> None:
        folder = self.settings.nats_credentials_dir
        if folder is None:
            # A bus without credentials: every connection may do anything, as before.
            await store.ensure_stream()
            return
        if not Credentials(Path(folder)).has(OPERATOR):
            await store.stream_info()
            return
        operator = await connect_bus(self.settings, OPERATOR, name="iotistic-stream-setup")
        try:
            await EventStore(operator.jetstream(), self.settings).ensure_stream()
        finally:
            with contextlib.suppress(*NATS_ERRORS):
                await operator.close()

    async def stop(self) -> None:
        """Stop every service, then drain their NATS connections."""
        if self._starter is not None and not self._starter.done():
            self._starter.cancel()
            await asyncio.gather(self._starter, return_exceptions=True)
        await asyncio.gather(*(s.stop() for s in self.services.values()))
        await asyncio.gather(*(_drain(nc) for nc in self.connections.values()))

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Every hosted service's readiness, its NATS connection's and the stream's."""
        detail: dict[str, Any] = {}
        connected = {
            name: name in self.connections and self.connections[name].is_connected
            for name in self.services
        }
        problem = self.bus_problem or self.stream_problem
        nats_ok = all(connected.values()) and problem is None
        detail["nats"] = {"ok": nats_ok, "connected": connected}
        if problem is not None:
            detail["nats"]["error"] = problem
        ok = nats_ok
        results = await asyncio.gather(
            *(
                runtime.readiness(connected[name] and self.stream_problem is None)
                for name, runtime in self.services.items()
            )
        )
        services: dict[str, Any] = {}
        for name, (ready, state) in zip(self.services, results, strict=True):
            services[name] = {"ready": ready, **state}
            ok = ok and ready
        detail["services"] = services
        for name, check in self.checks.items():
            check_ok, state = check()
            detail[name] = {"ok": check_ok, **state}
            ok = ok and check_ok
        return ok, detail


class CredentialsRefused(nats.errors.Error):
    """The NATS server refused the user or password a connection gave."""


def server_asks_for_credentials(nc: NatsClient) -> bool:
    """Whether the server ``nc`` is connected to requires clients to authenticate."""
    info: Mapping[str, Any] = getattr(nc, "_server_info", {})  # nats-py keeps its INFO here
    return bool(info.get("auth_required"))


async def _drain(nc: NatsClient) -> None:
    if nc.is_closed:
        return
    with contextlib.suppress(*NATS_ERRORS):
        await asyncio.wait_for(nc.drain(), timeout=5)


async def connect_bus(
    settings: EventLogSettings, user: str, *, name: str | None = None, attempts: int = 3
) -> NatsClient:
    """A NATS connection as bus user ``user``, with its password from NATS_CREDENTIALS_DIR.

    Without a credentials folder the connection gives no credentials (a bus that asks for
    none). ``BusAuthError`` names a missing password file.
    """
    folder = settings.nats_credentials_dir
    if folder is None:
        return await connect_nats(settings.nats_url, name=name or user, attempts=attempts)
    password = Credentials(Path(folder)).password(user)
    return await connect_nats(
        settings.nats_url, name=name or user, attempts=attempts, user=user, password=password
    )


async def connect_nats(
    url: str,
    name: str = "iotistic",
    attempts: int = 3,
    *,
    user: str | None = None,
    password: str | None = None,
) -> NatsClient:
    """A NATS connection that, once made, reconnects forever.

    The first connection is tried ``attempts`` times per server and then fails with a NATS
    error, so a caller (the platform's start loop, a CLI command) can report it instead of
    hanging silently. With ``user``, replies come to that user's own inbox prefix, the only
    one the bus lets it subscribe to.
    """
    servers = [u.strip() for u in url.split(",") if u.strip()]
    client_ref: list[NatsClient] = []
    refused: list[str] = []

    async def on_error(exc: Exception) -> None:
        if "authorization violation" in str(exc).lower():
            refused.append(str(exc))
        # A refused publish or subscription is a bug or an attack, never noise: say so.
        if "permissions violation" in str(exc).lower():
            log.error("nats (%s): %s", user or name, exc)
            return
        log.debug("nats: %s", exc)

    async def on_disconnected() -> None:
        # Closing on purpose also "disconnects"; only an unplanned loss is worth a warning.
        if client_ref and (client_ref[0].is_closed or client_ref[0].is_draining):
            return
        log.warning("nats: disconnected")

    async def on_reconnected() -> None:
        log.info("nats: reconnected")

    credentials: dict[str, Any] = {}
    if user is not None:
        credentials = {"user": user, "password": password, "inbox_prefix": inbox_prefix(user)}
    try:
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
            **credentials,
        )
    except NATS_ERRORS as exc:
        if refused:
            # nats-py reports only "no servers available": say what the server said.
            raise CredentialsRefused(
                f"NATS refused the credentials of {user or 'this client'} (Authorization "
                "Violation): check its password file in NATS_CREDENTIALS_DIR and the server's "
                "authorization block"
            ) from exc
        raise
    # nats-py reads this option on every reconnect: from now on, never give up.
    client.options["max_reconnect_attempts"] = -1
    client_ref.append(client)
    return client
