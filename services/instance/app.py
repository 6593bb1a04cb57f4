"""The customer instance (target ``instance``): devices, ingest, queries, usage and its license.

One process per customer, with a database of its own. This module wires it: the parts the
routes use (``state.InstanceState``, kept in the app's state), the API's controllers
(``api``), and the tasks its lifespan runs under one supervisor: the license kept current, the
database, MQTT ingest, housekeeping, usage reports, alerts and the devices' broker clients.
Without a session the instance shows nothing of its customer, neither the id nor the usage
(``api.access``, ``api.monitoring``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
from litestar import Litestar
from prometheus_client import CollectorRegistry

from libs.db.postgres import CONNECTION_ERRORS, Turns
from libs.http.app import create_app
from libs.runtime.supervision import Supervisor, restart_counter, then_idle
from services.instance.alerts.engine import AlertEngine
from services.instance.alerts.presets import install_presets
from services.instance.alerts.targets import WebhookTargets
from services.instance.api.alerts import AlertsController
from services.instance.api.calibration import CalibrationController
from services.instance.api.dashboard import DashboardController
from services.instance.api.dead_letters import DeadLettersController
from services.instance.api.device_config import DeviceConfigController
from services.instance.api.devices import DevicesController
from services.instance.api.export import ExportController
from services.instance.api.integrations import IntegrationsController
from services.instance.api.license import LicenseController
from services.instance.api.monitoring import MonitoringController
from services.instance.api.provisioning import PROVISIONING_ROUTES
from services.instance.api.quotas import QuotasController, meters_now
from services.instance.api.readings import ReadingsController
from services.instance.auth import CustomerSessions
from services.instance.config_publisher import ConfigPublisher
from services.instance.database import Database
from services.instance.devices import Devices, broker_address, broker_urls
from services.instance.housekeeping import UsageGauges, housekeeping
from services.instance.ingest import Ingest, IngestMetrics
from services.instance.integrations.sender import IntegrationSender
from services.instance.license import LicenseHolder, keep_license_current, until_licensed
from services.instance.live import LiveReadings
from services.instance.quota_notices import QuotaWatch
from services.instance.registration import FleetRegistrations
from services.instance.settings import InstanceSettings, dashboard_csrf_key
from services.instance.start import FirstStart
from services.instance.state import STATE_KEY, InstanceState
from services.instance.usage import UsageReporter, usage_day

Tasks = dict[str, Callable[[], Awaitable[None]]]


# What the instance serves: the dashboard and its customer API, the fleet's own routes.
ROUTES = [
    DashboardController,
    LicenseController,
    DevicesController,
    DeviceConfigController,
    CalibrationController,
    ReadingsController,
    DeadLettersController,
    AlertsController,
    QuotasController,
    IntegrationsController,
    ExportController,
    *PROVISIONING_ROUTES,
]


def create_instance_app(settings: InstanceSettings) -> Litestar:
    """The instance's HTTP app and, in its lifespan, ingest and housekeeping."""
    registry = CollectorRegistry()
    holder = LicenseHolder(settings, registry)
    database = Database(settings.database_url)
    live = LiveReadings()
    ingest = Ingest(
        settings, database.pool_if_connected, holder, IngestMetrics(registry), live.publish
    )
    brokers = broker_urls(settings)
    targets = WebhookTargets.from_setting(settings.alert_webhook_allowed_cidrs)
    # The periodic work (alerts, housekeeping, usage reports, readiness) takes the database in
    # turns, so an idle instance needs one connection however its timers fall together.
    turns = Turns(database.pool)
    alerts = _alert_engine(settings, turns, holder, targets, registry)
    supervisor = Supervisor("instance", restart_counter(registry))
    publisher = ConfigPublisher(settings, database.pool_if_connected)
    devices = Devices(settings, clear_config=publisher.clear)
    instance = InstanceState(
        settings=settings,
        registry=registry,
        license=holder,
        database=database,
        sessions=CustomerSessions(settings.control_plane_url, settings.instance_customer_id),
        devices=devices,
        fleet=FleetRegistrations(devices),
        ingest=ingest,
        config_publisher=publisher,
        live=live,
        webhook_targets=targets,
        brokers=brokers,
        broker_address=broker_address(brokers[0]),
        readiness=lambda: _readiness(instance, turns, alerts, supervisor),
        csrf_key=dashboard_csrf_key(settings),
    )
    start = FirstStart(settings)
    tasks = _tasks(instance, turns, alerts, UsageGauges(registry), start)
    tasks["integrations"] = _integration_sender(instance, turns).run
    app = create_app(
        # Public (/schema): no customer id in it.
        title="Iotistic instance",
        route_handlers=ROUTES,
        readiness=instance.readiness,
        registry=registry,
        lifespan=[lambda _: _running(instance, supervisor, tasks, start)],
        health=[MonitoringController],
        # A span per request only where spans go somewhere: hundreds of instances run per
        # host, and the ASGI instrumentation costs each about 2 MiB (server.py).
        tracing=settings.otel_exporter != "none",
    )
    app.state[STATE_KEY] = instance
    return app


def _alert_engine(
    settings: InstanceSettings,
    turns: Turns,
    holder: LicenseHolder,
    targets: WebhookTargets,
    registry: CollectorRegistry,
) -> AlertEngine:
    return AlertEngine(
        lambda: turns,
        settings.instance_customer_id,
        lambda: holder.allows_alerting(datetime.now(UTC)),
        targets=targets,
        registry=registry,
    )


def _integration_sender(instance: InstanceState, turns: Turns) -> IntegrationSender:
    def sending() -> bool:
        claims = instance.license.claims
        return claims is not None and claims.features.webhooks

    return IntegrationSender(
        lambda: turns,
        instance.settings.instance_customer_id,
        sending,
        targets=instance.webhook_targets,
        registry=instance.registry,
    )


def _tasks(
    instance: InstanceState,
    turns: Turns,
    alerts: AlertEngine,
    gauges: UsageGauges,
    start: FirstStart,
) -> Tasks:
    """The instance's long-lived tasks, by name (as readiness shows them); the parts of its
    first start are spans of ``start``."""
    settings, ingest = instance.settings, instance.ingest
    return {
        "license": lambda: _keep_license(instance.license, start),
        "database": lambda: then_idle(_open_database(instance, start)),
        "ingest": ingest.run,
        "housekeeping": lambda: housekeeping(
            lambda: turns, instance.license, ingest, gauges, instance.api_requests, instance.devices
        ),
        "usage reports": UsageReporter(settings, lambda: turns).run,
        "alerts": alerts.run,
        "devices": lambda: then_idle(_converge_devices(instance, start)),
        "device configs": instance.config_publisher.run,
        "quotas": QuotaWatch(settings, lambda: turns, lambda n: meters_now(instance, n)).run,
    }


async def _keep_license(holder: LicenseHolder, start: FirstStart) -> None:
    """The first license (its keys fetched) as a part of the first start, then kept current."""
    with start.part("license"):
        await until_licensed(holder)
    await keep_license_current(holder)


async def _converge_devices(instance: InstanceState, start: FirstStart) -> None:
    with start.part("devices"):
        await instance.devices.converge_at_start(instance.database.pool_if_connected)


async def _open_database(instance: InstanceState, start: FirstStart) -> None:
    """Connect (migrating), install the alert presets not installed yet, then take up the
    day's counts where a restart left them."""
    with start.part("database"):
        await _open_database_now(instance)


async def _open_database_now(instance: InstanceState) -> None:
    await instance.database.connect()
    await instance.ingest.load_usage()
    async with instance.pool().acquire() as conn:
        await install_presets(conn)
        today = await usage_day(conn, instance.api_requests.day)
    instance.api_requests.count = today["api_requests"] if today else 0


@contextlib.asynccontextmanager
async def _running(
    instance: InstanceState, supervisor: Supervisor, tasks: Tasks, start: FirstStart
) -> AsyncIterator[None]:
    """Every task under the supervisor while the app serves: one that crashes is logged,
    counted and started again, and readiness says so meanwhile. The start-up steps stay done
    once done; the span of the first start ends once the instance is first ready. A SIGHUP
    re-reads the license (the local backend sends one when it changes)."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(instance.license.load()))
    start.begin()
    for name, run in tasks.items():
        supervisor.spawn(name, run)
    # Not one of the supervised tasks: it ends (it only watches), and ends its span if it fails.
    started = loop.create_task(start.until_ready(instance.readiness), name="first start")
    try:
        yield
    finally:
        started.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await started
        start.end("stopped before it was ready")
        await supervisor.stop(0)
        with contextlib.suppress(*CONNECTION_ERRORS, asyncpg.PostgresError):
            await instance.ingest.flush()
        loop.remove_signal_handler(signal.SIGHUP)
        await instance.database.close()


async def _readiness(
    instance: InstanceState, turns: Turns, alerts: AlertEngine, supervisor: Supervisor
) -> tuple[bool, dict[str, Any]]:
    """Whether the instance is ready, and the detail only monitoring sees."""
    settings, holder = instance.settings, instance.license
    database = await instance.database.answers(turns)
    status = holder.status(datetime.now(UTC))
    claims = holder.claims
    alerting = not alerts.stalled()
    tasks_ok, tasks = supervisor.health()
    away = instance.ingest.disconnected_for()
    # An instance given no broker account ingests nothing, and is not the worse for it.
    broker = settings.mqtt_username is None or away <= settings.ingest_broker_grace_seconds
    detail = {
        "customer_id": settings.instance_customer_id,
        "database": {"ok": database},
        "broker": {"ok": broker, "disconnected_seconds": round(away, 1)},
        "alerts": {"ok": alerting},
        "tasks": {"ok": tasks_ok, **tasks},
        "license": {
            "ok": status is not None,
            "status": status,
            "license_id": claims.licenseId if claims else None,
            "error": holder.error,
        },
    }
    return database and status is not None and alerting and tasks_ok and broker, detail
