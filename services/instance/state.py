"""What a running instance's routes work with, made once per app and kept in its state
(``app.state["instance"]``): the license, the database, the customer's sessions, the devices'
broker credentials, ingest, the live readings and the day's count of API requests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, cast

import asyncpg
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from prometheus_client import CollectorRegistry

from contracts.license import LicenseClaims
from libs.http.app import Readiness
from libs.http.errors import Forbidden, TooManyRequests
from services.instance.alerts.targets import WebhookTargets
from services.instance.auth import CustomerSessions
from services.instance.config_publisher import ConfigPublisher
from services.instance.database import Database
from services.instance.devices import Devices
from services.instance.ingest import Ingest
from services.instance.license import LicenseHolder
from services.instance.live import LiveReadings
from services.instance.registration import FleetRegistrations
from services.instance.settings import InstanceSettings

STATE_KEY = "instance"


def _today() -> date:
    return datetime.now(UTC).date()


@dataclass
class ApiRequestsToday:
    """The API requests of the day (UTC), counted against the license's
    ``apiRequestsPerDay``."""

    day: date = field(default_factory=_today)
    count: int = 0

    def take(self, now: datetime, limit: int) -> None:
        """Count one request at ``now``; ``TooManyRequests`` (until midnight UTC) once the
        day's ``limit`` is used."""
        if self.day != now.date():
            self.day, self.count = now.date(), 0
        if self.count >= limit:
            midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
            raise TooManyRequests(
                f"the license allows {limit} API requests a day",
                int((midnight - now).total_seconds()) + 1,
            )
        self.count += 1


@dataclass
class InstanceState:
    """The parts of one customer's instance that its routes use."""

    settings: InstanceSettings
    registry: CollectorRegistry
    license: LicenseHolder
    database: Database
    sessions: CustomerSessions
    devices: Devices
    # Devices registering themselves with a provisioning key (fleet provisioning).
    fleet: FleetRegistrations
    ingest: Ingest
    # Delivers fleet devices' desired configurations (retained on their config topics).
    config_publisher: ConfigPublisher
    live: LiveReadings
    webhook_targets: WebhookTargets
    # Where devices connect (``broker_urls``), and the first one's host and port.
    brokers: list[str]
    broker_address: tuple[str, int]
    readiness: Readiness
    # Signs the dashboard's CSRF tokens (``api.access.csrf_token``): derived, never provisioned.
    csrf_key: bytes
    api_requests: ApiRequestsToday = field(default_factory=ApiRequestsToday)
    # One export or import at a time: each holds a connection of the pool for its length.
    archive_turn: asyncio.Lock = field(default_factory=asyncio.Lock)

    def pool(self) -> asyncpg.Pool:
        """The database's pool (a connection error, answered 503, until it answers)."""
        return self.database.pool()

    def licensed(self) -> LicenseClaims:
        """The license's claims; ``Forbidden`` while the instance holds no valid license."""
        claims = self.license.claims
        if claims is None:
            raise Forbidden("this instance has no valid license yet")
        return claims

    def read_only(self) -> bool:
        """No license yet, or past its grace: queries only, no ingest and no changes."""
        return self.license.read_only(datetime.now(UTC))


def instance_of(connection: ASGIConnection[Any, Any, Any, Any]) -> InstanceState:
    """The state of the instance serving ``connection`` (for guards)."""
    return cast(InstanceState, connection.app.state[STATE_KEY])


def provide_instance(state: State) -> InstanceState:
    """The instance's state, as a dependency of the route handlers (``instance``)."""
    return cast(InstanceState, state[STATE_KEY])
