"""The customer instance (target ``instance``): devices, ingest, queries, usage and its license.

One process per customer, with a database of its own. Routes under ``/api`` need the
customer's session token (checked with the control plane) and count against the license's
``apiRequestsPerDay``; a session of another customer gets 404, as if nothing were here. An
expired license (after its grace) makes the instance read-only: queries answer, ingest and
changes stop, and every answer about it says why. Without a session the instance shows nothing
of its customer, neither the id nor the usage (the health and metrics routes are in
``monitoring``).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import logging
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import asyncpg
from litestar import Litestar, Request, delete, get, post
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.response import Stream
from prometheus_client import CollectorRegistry, Gauge

from contracts.license import LicenseClaims
from libs.db.postgres import CONNECTION_ERRORS, Turns, create_pool, load_migrations, migrate
from libs.http.app import create_app
from libs.http.auth import bearer
from libs.http.errors import (
    Forbidden,
    InvalidRequest,
    NotFound,
    TooManyRequests,
    Unauthorized,
    UpstreamError,
    invalid,
)
from libs.http.input_checks import control_character_reason
from libs.runtime.supervision import Supervisor, restart_counter, retrying, then_idle
from services.instance.alerts import (
    AlertEngine,
    RuleError,
    WebhookTargets,
    create_rule,
    parse_rule,
)
from services.instance.auth import ControlPlaneUnavailable, CustomerSessions
from services.instance.dashboard import LiveReadings, dashboard_routes, session_cookie
from services.instance.devices import (
    BrokerUnavailable,
    DeviceLimitReached,
    Devices,
    broker_address,
    broker_urls,
    device_view,
)
from services.instance.ingest import Ingest, IngestMetrics
from services.instance.license import LicenseHolder, keep_license_current
from services.instance.monitoring import monitoring_routes
from services.instance.readings import (
    METRICS,
    BucketName,
    aggregate,
    drop_expired_partitions,
    latest,
    parse_metrics,
)
from services.instance.settings import InstanceSettings
from services.instance.usage import UsageReporter

log = logging.getLogger(__name__)

SCHEMA = "instance"
BODY_LIMIT = 4096
CSV_ROWS = 1_000_000
# The pool: up to 6 connections under load, and one once idle, which its periodic tasks (alerts
# every 2 s) keep warm; a connection unused this long is closed. Hundreds of instances share
# one Postgres, whose connections are the scarce thing (an idle backend costs it memory too).
POOL_MAX = 6
POOL_IDLE_SECONDS = 10.0


# Times a query may name, in UTC: a timestamptz, a Python datetime and every offset of both
# hold them, so no range arithmetic overflows.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 30, tzinfo=UTC)
TIME_DOC = "RFC 3339 time (UTC without an offset), from 1970-01-01 to 9999-12-30 in UTC"
METRICS_PATTERN = f"^(({'|'.join(METRICS)})(,({'|'.join(METRICS)}))*)?$"
From = Annotated[
    datetime | None,
    QueryParameter(name="from", description=f"{TIME_DOC}; default: `to` minus 24 hours"),
]
To = Annotated[datetime | None, QueryParameter(name="to", description=f"{TIME_DOC}; default: now")]
Bucket = Annotated[BucketName, QueryParameter(description="bucket width")]
Metrics = Annotated[
    str | None,
    QueryParameter(
        description=f"comma-separated, any of {', '.join(METRICS)}; absent or empty: all",
        max_length=len(",".join(METRICS)),
        pattern=METRICS_PATTERN,
    ),
]


def _utc(value: datetime | None, field: str, default: datetime) -> datetime:
    if value is None:
        return default
    try:
        moment = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except OverflowError:  # 9999-12-31T23:59-14:00 is in the year 10000 in UTC
        moment = None
    if moment is None or not EARLIEST <= moment <= LATEST:
        raise invalid(field, "must be from 1970-01-01 to 9999-12-30 (UTC)")
    return moment


def create_instance_app(settings: InstanceSettings) -> Litestar:
    """The instance's HTTP app and, in its lifespan, ingest and housekeeping."""
    registry = CollectorRegistry()
    holder = LicenseHolder(settings, registry)
    state: dict[str, asyncpg.Pool] = {}
    metrics = IngestMetrics(registry)
    live = LiveReadings()
    ingest = Ingest(settings, lambda: state.get("pool"), holder, metrics, live.publish)
    sessions = CustomerSessions(settings.control_plane_url, settings.instance_customer_id)
    devices = Devices(settings)
    brokers = broker_urls(settings)
    broker_host, broker_port = broker_address(brokers[0])
    api_today: dict[str, Any] = {"day": datetime.now(UTC).date(), "count": 0}
    gauges = _usage_gauges(registry)
    supervisor = Supervisor("instance", restart_counter(registry))

    def alerting_allowed() -> bool:
        claims = holder.claims
        return bool(claims and claims.features.alerting) and not holder.read_only(datetime.now(UTC))

    webhook_targets = WebhookTargets.from_setting(settings.alert_webhook_allowed_cidrs)
    # The periodic work (alerts, housekeeping, usage reports, readiness) takes the database in
    # turns, so an idle instance needs one connection however its timers fall together.
    turns = Turns(lambda: pool())
    alerts = AlertEngine(
        lambda: turns,
        settings.instance_customer_id,
        alerting_allowed,
        targets=webhook_targets,
        registry=registry,
    )

    def pool() -> asyncpg.Pool:
        found = state.get("pool")
        if found is None:
            raise asyncpg.exceptions.CannotConnectNowError("the database is not reachable yet")
        return found

    async def connect() -> None:
        async for attempt in retrying((*CONNECTION_ERRORS, asyncpg.PostgresError)):
            with attempt:
                try:
                    conn = await asyncpg.connect(settings.database_url)
                    try:
                        await migrate(
                            conn, SCHEMA, load_migrations("services.instance.migrations", "service")
                        )
                    finally:
                        await conn.close()
                    state["pool"] = await create_pool(
                        settings.database_url,
                        SCHEMA,
                        min_size=1,
                        max_size=POOL_MAX,
                        idle_seconds=POOL_IDLE_SECONDS,
                    )
                except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                    log.warning("database not reachable (%s); retrying", type(exc).__name__)
                    raise
        await ingest.load_usage()
        async with pool().acquire() as conn:
            api_today["count"] = int(
                await conn.fetchval(
                    "SELECT api_requests FROM usage_days WHERE day = $1", api_today["day"]
                )
                or 0
            )

    @contextlib.asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(holder.load()))
        # Every task under the supervisor: one that crashes is logged, counted and started
        # again, and readiness says so meanwhile. The start-up steps stay done once done.
        supervisor.spawn("license", lambda: keep_license_current(holder))
        supervisor.spawn("database", lambda: then_idle(connect()))
        supervisor.spawn("ingest", ingest.run)
        supervisor.spawn(
            "housekeeping", lambda: _housekeeping(lambda: turns, holder, ingest, gauges, api_today)
        )
        supervisor.spawn("usage reports", UsageReporter(settings, lambda: turns).run)
        supervisor.spawn("alerts", alerts.run)
        supervisor.spawn(
            "devices", lambda: then_idle(devices.converge_at_start(lambda: state.get("pool")))
        )
        try:
            yield
        finally:
            await supervisor.stop(0)
            with contextlib.suppress(*CONNECTION_ERRORS, asyncpg.PostgresError):
                await ingest.flush()
            loop.remove_signal_handler(signal.SIGHUP)
            if "pool" in state:
                await state["pool"].close()

    async def readiness() -> tuple[bool, dict[str, Any]]:
        """Whether the instance is ready, and the detail only monitoring sees."""
        database = await _database_ok(state.get("pool"), turns)
        status = holder.status(datetime.now(UTC))
        claims = holder.claims
        alerting = not alerts.stalled()
        tasks_ok, tasks = supervisor.health()
        away = ingest.disconnected_for()
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

    async def authorize(request: Request[Any, Any, Any]) -> None:
        """The customer's own session, API access in the license, and today's quota."""
        try:
            who = await sessions.caller(bearer(request) or session_cookie(request))
        except ControlPlaneUnavailable as exc:
            raise UpstreamError(f"cannot check the session: {exc}") from None
        if who == "nobody":
            raise Unauthorized(
                "a valid session token is required", headers={"WWW-Authenticate": "Bearer"}
            )
        if who == "other":
            raise NotFound("not found")
        claims = licensed()
        if not claims.features.apiAccess:
            raise Forbidden("the license does not include API access")
        now = datetime.now(UTC)
        if api_today["day"] != now.date():
            api_today.update(day=now.date(), count=0)
        if api_today["count"] >= claims.limits.apiRequestsPerDay:
            midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
            raise TooManyRequests(
                f"the license allows {claims.limits.apiRequestsPerDay} API requests a day",
                int((midnight - now).total_seconds()) + 1,
            )
        api_today["count"] += 1
        ingest.count_api_request()

    def licensed() -> LicenseClaims:
        claims = holder.claims
        if claims is None:
            raise Forbidden("this instance has no valid license yet")
        return claims

    def writable() -> None:
        if holder.read_only(datetime.now(UTC)):
            raise Forbidden(
                "read-only: the license has expired (its grace period included); renew the "
                "subscription to make changes and ingest readings again"
            )

    @get("/api/license", tags=["instance"])
    async def license_view(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """The license this instance runs under and what it allows."""
        await authorize(request)
        claims = holder.claims
        if claims is None:
            return {"status": None, "error": holder.error}
        status = holder.status(datetime.now(UTC))
        return {
            "customer_id": claims.customerId,
            "license_id": claims.licenseId,
            "license_type": claims.licenseType,
            "plan": claims.plan,
            "expires_at": claims.expiresAt,
            "grace_until": claims.graceUntil,
            "status": status,
            "mode": "read-only" if status == "expired" else "read-write",
            "features": claims.features,
            "limits": claims.limits,
            "error": holder.error,
        }

    @post("/api/devices", status_code=201, request_max_body_size=BODY_LIMIT, tags=["devices"])
    async def register_device(
        data: JSONBody[dict[str, Any]], request: Request[Any, Any, Any]
    ) -> dict[str, Any]:
        """A new device and its broker credentials; the password is shown only here."""
        await authorize(request)
        writable()
        name = _device_name(data)
        async with pool().acquire() as conn:
            try:
                device = await devices.register(conn, name, licensed().features.maxDevices)
            except DeviceLimitReached as exc:
                raise Forbidden(str(exc)) from None
            except BrokerUnavailable as exc:
                raise UpstreamError(str(exc)) from None
        ingest.know_device(device.device_id)
        return {
            "device_id": device.device_id,
            "name": device.name,
            "mqtt": {
                "host": broker_host,
                "port": broker_port,
                "urls": brokers,
                "username": device.mqtt_username,
                "password": device.mqtt_password,
                "client_id": device.mqtt_client_id,
                "topics": device.topics,
            },
            "note": "the password is shown only once; store it on the device",
        }

    @get("/api/devices", tags=["devices"])
    async def list_devices(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """The customer's devices with their latest values and online state."""
        await authorize(request)
        # One snapshot for both: a batch committed between them would show a reading with a
        # device not seen yet.
        async with (
            pool().acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            rows = await conn.fetch(
                "SELECT * FROM devices WHERE deleted_at IS NULL ORDER BY created_at"
            )
            newest = await latest(conn, [r["device_id"] for r in rows])
        now = datetime.now(UTC)
        return {"devices": [device_view(r, newest.get(r["device_id"]), now) for r in rows]}

    @get("/api/devices/{device_id:str}", tags=["devices"])
    async def get_device(
        device_id: FromPath[str], request: Request[Any, Any, Any]
    ) -> dict[str, Any]:
        """One device."""
        await authorize(request)
        async with (
            pool().acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            row = await _device(conn, device_id)
            newest = await latest(conn, [device_id])
        return device_view(row, newest.get(device_id), datetime.now(UTC))

    @delete("/api/devices/{device_id:str}", status_code=204, tags=["devices"])
    async def delete_device(device_id: FromPath[str], request: Request[Any, Any, Any]) -> None:
        """Revoke the device's credentials at once; its readings stay until retention."""
        await authorize(request)
        writable()
        async with pool().acquire() as conn:
            try:
                removed = await devices.remove(conn, device_id)
            except BrokerUnavailable as exc:
                raise UpstreamError(str(exc)) from None
        if not removed:
            raise NotFound(f"no device {device_id}")
        ingest.forget_device(device_id)

    @get("/api/devices/{device_id:str}/readings", tags=["readings"])
    async def readings(
        device_id: FromPath[str],
        request: Request[Any, Any, Any],
        start_at: From = None,
        end_at: To = None,
        bucket: Bucket = "5m",
        metrics: Metrics = None,
    ) -> dict[str, Any]:
        """avg/min/max per bucket (``1m``, ``5m``, ``1h``, ``1d``) between ``from`` and ``to``."""
        await authorize(request)
        start, end, metrics_asked = _range(start_at, end_at, metrics)
        async with pool().acquire() as conn:
            await _device(conn, device_id, include_deleted=True)
            return await aggregate(conn, device_id, start, end, bucket, metrics_asked)

    @get("/api/devices/{device_id:str}/readings.csv", tags=["readings"])
    async def readings_csv(
        device_id: FromPath[str],
        request: Request[Any, Any, Any],
        start_at: From = None,
        end_at: To = None,
    ) -> Stream:
        """Every stored reading between ``from`` and ``to`` as CSV."""
        await authorize(request)
        start, end, _ = _range(start_at, end_at)
        async with pool().acquire() as conn:
            await _device(conn, device_id, include_deleted=True)

        async def rows() -> AsyncIterator[str]:
            chunk = io.StringIO()
            writer = csv.writer(chunk)
            writer.writerow(["ts", *METRICS])
            async with pool().acquire() as conn, conn.transaction():
                cursor = conn.cursor(
                    "SELECT ts, " + ", ".join(METRICS) + " FROM readings WHERE device_id = $1 "
                    "AND ts >= $2 AND ts < $3 ORDER BY ts LIMIT $4",
                    device_id,
                    start,
                    end,
                    CSV_ROWS,
                )
                async for row in cursor:
                    writer.writerow([row["ts"].isoformat(), *(row[m] for m in METRICS)])
                    if chunk.tell() > 65536:
                        yield chunk.getvalue()
                        chunk.seek(0)
                        chunk.truncate()
                yield chunk.getvalue()

        # The first chunk is made before the answer starts: the query's arguments and its
        # first rows are taken while an error can still be a status, not a cut-off body.
        body = rows()
        first = await anext(body)

        async def whole() -> AsyncIterator[str]:
            yield first
            async for part in body:
                yield part

        return Stream(
            whole(),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{device_id}.csv"'},
        )

    @get("/api/readings/latest", tags=["readings"])
    async def latest_readings(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """The newest reading of every device."""
        await authorize(request)
        async with pool().acquire() as conn:
            ids = [
                r["device_id"]
                for r in await conn.fetch("SELECT device_id FROM devices WHERE deleted_at IS NULL")
            ]
            return {"latest": await latest(conn, ids)}

    @get("/api/usage", tags=["instance"])
    async def usage(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Today's usage against the license's limits."""
        await authorize(request)
        claims = licensed()
        async with pool().acquire() as conn:
            today = await conn.fetchrow(
                "SELECT * FROM usage_days WHERE day = $1", datetime.now(UTC).date()
            )
            count = await conn.fetchval("SELECT count(*) FROM devices WHERE deleted_at IS NULL")
            dead = await conn.fetchval("SELECT count(*) FROM dead_letters")
        return {
            "day": datetime.now(UTC).date(),
            "devices": {"used": count, "limit": claims.features.maxDevices},
            "mqtt_messages": {
                "used": ingest.accepted_today,
                "limit": claims.limits.mqttMessagesPerDay,
            },
            "api_requests": {"used": api_today["count"], "limit": claims.limits.apiRequestsPerDay},
            "rejected_readings": today["rejected_readings"] if today else 0,
            "over_quota_readings": today["over_quota_readings"] if today else 0,
            "dead_letters": dead,
            "mode": "read-only" if holder.read_only(datetime.now(UTC)) else "read-write",
        }

    @get("/api/dead-letters", tags=["readings"])
    async def dead_letters(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """The latest rejected messages and why (payloads cut at 4 KiB)."""
        await authorize(request)
        async with pool().acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, received_at, topic, device_id, reason, "
                "convert_from(substring(payload for 512), 'SQL_ASCII') AS payload "
                "FROM dead_letters ORDER BY id DESC LIMIT 100"
            )
        return {"dead_letters": [dict(r) for r in rows]}

    def alerting() -> LicenseClaims:
        claims = licensed()
        if not claims.features.alerting:
            raise Forbidden("the license does not include alerting")
        return claims

    @post("/api/alerts/rules", status_code=201, request_max_body_size=BODY_LIMIT, tags=["alerts"])
    async def create_alert_rule(
        data: JSONBody[Any], request: Request[Any, Any, Any]
    ) -> dict[str, Any]:
        """A rule; with ``webhook_url`` its signing secret is in this answer only."""
        await authorize(request)
        writable()
        claims = alerting()
        try:
            rule = await parse_rule(data, claims.features.webhooks, webhook_targets)
        except RuleError as exc:
            if exc.field == "webhook_url" and "license" in exc.reason:
                raise Forbidden(exc.reason) from None
            raise InvalidRequest(
                "invalid rule", fields=[{"field": exc.field, "reason": exc.reason}]
            ) from None
        async with pool().acquire() as conn:
            return await create_rule(conn, rule)

    @get("/api/alerts/rules", tags=["alerts"])
    async def list_alert_rules(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """The rules (without their secrets) and each device's state under them."""
        await authorize(request)
        async with pool().acquire() as conn:
            rules = await conn.fetch(
                "SELECT rule_id, name, metric, operator, threshold, for_seconds, devices, "
                "webhook_url, created_at FROM alert_rules WHERE deleted_at IS NULL "
                "ORDER BY created_at"
            )
            states = await conn.fetch("SELECT * FROM alert_states")
        by_rule: dict[str, list[dict[str, Any]]] = {}
        for state in states:
            by_rule.setdefault(state["rule_id"], []).append(dict(state))
        return {"rules": [{**dict(r), "states": by_rule.get(r["rule_id"], [])} for r in rules]}

    @delete("/api/alerts/rules/{rule_id:str}", status_code=204, tags=["alerts"])
    async def delete_alert_rule(rule_id: FromPath[str], request: Request[Any, Any, Any]) -> None:
        """Stop evaluating a rule (its history stays)."""
        await authorize(request)
        writable()
        async with pool().acquire() as conn:
            done = await conn.execute(
                "UPDATE alert_rules SET deleted_at = now() WHERE rule_id = $1 "
                "AND deleted_at IS NULL",
                rule_id,
            )
            await conn.execute("DELETE FROM alert_states WHERE rule_id = $1", rule_id)
        if done.endswith(" 0"):
            raise NotFound(f"no rule {rule_id}")

    @get("/api/alerts/history", tags=["alerts"])
    async def alert_history(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Firings and resolutions, newest first."""
        await authorize(request)
        async with pool().acquire() as conn:
            rows = await conn.fetch("SELECT * FROM alert_history ORDER BY id DESC LIMIT 200")
        return {"history": [dict(r) for r in rows]}

    return create_app(
        # Public (/schema): no customer id in it.
        title="Iotistic instance",
        route_handlers=[
            *dashboard_routes(settings, live, authorize),
            license_view,
            register_device,
            list_devices,
            get_device,
            delete_device,
            readings,
            readings_csv,
            latest_readings,
            usage,
            dead_letters,
            create_alert_rule,
            list_alert_rules,
            delete_alert_rule,
            alert_history,
        ],
        readiness=readiness,
        registry=registry,
        lifespan=[lifespan],
        health=monitoring_routes(readiness, registry, settings.monitoring_token, authorize),
        # An instance sets up no tracer (its spans would go nowhere); hundreds run per host.
        tracing=False,
    )


def _device_name(data: Any) -> str:
    fields = []
    if not isinstance(data, dict):
        raise InvalidRequest(
            "invalid request", fields=[{"field": "body", "reason": "must be a JSON object"}]
        )
    fields += [
        {"field": str(k)[:64], "reason": "is not a known field"}
        for k in sorted(set(data) - {"name"}, key=str)
    ]
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        fields.append({"field": "name", "reason": "is required"})
    elif len(name) > 100:
        fields.append({"field": "name", "reason": "must be at most 100 characters"})
    elif reason := control_character_reason(name):
        fields.append({"field": "name", "reason": reason})
    if fields:
        raise InvalidRequest("invalid request", fields=fields)
    return str(name).strip()


def _range(
    start_at: datetime | None, end_at: datetime | None, metrics: str | None = None
) -> tuple[datetime, datetime, list[str]]:
    end = _utc(end_at, "to", datetime.now(UTC))
    start = _utc(start_at, "from", end - timedelta(hours=24))
    fields = []
    if start >= end:
        fields.append({"field": "from", "reason": "must be before to"})
    if end - start > timedelta(days=400):
        fields.append({"field": "from", "reason": "the range may span at most 400 days"})
    try:
        asked = parse_metrics(metrics)
    except ValueError as exc:
        fields.append({"field": "metrics", "reason": str(exc)})
        asked = []
    if fields:
        raise InvalidRequest("invalid request", fields=fields)
    return start, end, asked


async def _device(
    conn: asyncpg.Connection, device_id: str, include_deleted: bool = False
) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM devices WHERE device_id = $1", device_id)
    if row is None or (row["deleted_at"] is not None and not include_deleted):
        raise NotFound(f"no device {device_id}")
    return row


def _usage_gauges(registry: CollectorRegistry) -> dict[str, Gauge]:
    return {
        "devices": Gauge("iotistic_instance_devices", "Registered devices", registry=registry),
        "mqtt_messages": Gauge(
            "iotistic_instance_mqtt_messages_today", "Readings accepted today", registry=registry
        ),
        "api_requests": Gauge(
            "iotistic_instance_api_requests_today", "API requests today", registry=registry
        ),
        "rejected": Gauge(
            "iotistic_instance_rejected_readings_today",
            "Readings rejected today",
            registry=registry,
        ),
        "storage": Gauge(
            "iotistic_instance_storage_bytes", "Size of the instance's database", registry=registry
        ),
    }


async def _housekeeping(
    pool: Any,
    holder: LicenseHolder,
    ingest: Ingest,
    gauges: dict[str, Gauge],
    api_today: dict[str, Any],
) -> None:
    """Every half minute: usage gauges; every hour: drop partitions past retention."""
    last_retention = 0.0
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(30 if last_retention else 2)
        try:
            async with pool().acquire() as conn:
                gauges["devices"].set(
                    await conn.fetchval("SELECT count(*) FROM devices WHERE deleted_at IS NULL")
                )
                today = await conn.fetchrow(
                    "SELECT * FROM usage_days WHERE day = $1", datetime.now(UTC).date()
                )
                gauges["rejected"].set(today["rejected_readings"] if today else 0)
                gauges["storage"].set(
                    await conn.fetchval("SELECT pg_database_size(current_database())")
                )
                claims = holder.claims
                if claims is not None and loop.time() - last_retention > 3600:
                    keep = datetime.now(UTC).date() - timedelta(
                        days=claims.features.dataRetentionDays
                    )
                    dropped = await drop_expired_partitions(conn, keep)
                    if dropped:
                        log.info("retention: dropped %s", ", ".join(dropped))
                    last_retention = loop.time()
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            log.warning("housekeeping: %s", type(exc).__name__)
        gauges["mqtt_messages"].set(ingest.accepted_today)
        gauges["api_requests"].set(api_today["count"])


async def _database_ok(pool: asyncpg.Pool | None, turns: Turns) -> bool:
    if pool is None:
        return False
    try:
        # In turn with the periodic work, but never more than a second behind it.
        async with turns.acquire(timeout=1, wait_turn=1) as conn:
            await conn.fetchval("SELECT 1")
    except (*CONNECTION_ERRORS, asyncpg.PostgresError, TimeoutError):
        return False
    return True
