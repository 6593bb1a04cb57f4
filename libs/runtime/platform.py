"""The process that hosts services: one in production, every control-plane service embedded.

A ``Platform`` hosts one service in production or every control-plane service in the embedded
default; the service code is the same either way, only the wiring differs. Each service has its
own NATS connection, as its own bus user (``libs/eventlog/bus_auth.py``: the server lets it
append only the events it owns), its own pool, schema and consumers, and the services talk to
each other only through the log, even inside one process. The platform also declares the event
stream where it holds the operator's credentials, and sums up everyone's readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats.js.errors
from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry

from libs.config import ConfigError, ServiceSettings, load_settings
from libs.eventlog.bus_auth import OPERATOR, BusAuthError, Credentials
from libs.eventlog.connection import (
    NATS_ERRORS,
    CredentialsRefused,
    connect_bus,
    drain_quietly,
    server_asks_for_credentials,
)
from libs.eventlog.store import EventStore
from libs.observability.metrics import ProjectionMetrics
from libs.runtime.service import ServiceDefinition, ServiceRuntime
from libs.runtime.supervision import restart_counter, retrying
from libs.sealing.vault import master_key

log = logging.getLogger(__name__)


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
        for settings in (self.settings, *self.service_settings.values()):
            if settings.data_keys_master_key:
                master_key(settings.data_keys_master_key)  # so projections can open sealed data
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
        await asyncio.gather(*(drain_quietly(nc) for nc in self.connections.values()))

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
