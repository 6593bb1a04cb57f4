"""Helpers the tests share: settings on a private stream, fresh databases, bounded polling."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import uvicorn
from litestar import Litestar

from contracts import Features, LicenseIssued, Limits
from libs.config import ServiceSettings
from libs.runtime import Platform, ServiceDefinition

T = TypeVar("T")


def with_database(url: str, database: str) -> str:
    """The same server URL naming another database."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


async def create_database(server_url: str) -> str:
    """A new empty database on the server; returns its URL."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(server_url, name)


@cache
def license_keys_dir() -> str:
    """A folder with one 2048-bit license signing key, made once per test process."""
    from services.licensing.keys import generate_key

    folder = Path(tempfile.mkdtemp(prefix="iotistic-keys-")) / "licensing"
    generate_key(folder, bits=2048)
    return str(folder)


# The suite signs many customers up from 127.0.0.1, as no person would: platforms that sign
# up more than a handful raise the limits as an operator would, through the settings.
SUITE_SIGNUP_LIMITS: dict[str, object] = {
    "signup_max_per_address": 100_000,
    "signup_max_per_hour": 100_000,
}


def make_platform(settings: ServiceSettings, definitions: Sequence[ServiceDefinition]) -> Platform:
    """A platform hosting ``definitions``, with the test license key for licensing."""
    return Platform.from_settings(
        settings, definitions, license_keys_dir=license_keys_dir(), **SUITE_SIGNUP_LIMITS
    )


def make_settings(database_url: str, nats_url: str, **overrides: object) -> ServiceSettings:
    """Settings on a stream and subject space of their own, so tests never see each other."""
    tag = secrets.token_hex(4)
    values: dict[str, object] = {
        "database_url": database_url,
        "nats_url": nats_url,
        "events_stream": f"T_{tag.upper()}",
        "events_subject_prefix": f"t{tag}.events",
        "projection_ack_wait_seconds": 5,
        "admin_token": secrets.token_urlsafe(32),
        "session_secret": secrets.token_urlsafe(32),
        "http_host": "127.0.0.1",
    }
    values.update(overrides)
    return ServiceSettings(**values)  # type: ignore[arg-type]


async def eventually(
    probe: Callable[[], Awaitable[T]],
    accept: Callable[[T], bool] = bool,
    *,
    timeout: float = 20.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``probe`` until ``accept`` holds for its result; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        try:
            last = await probe()
            if accept(last):
                return last
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, httpx.TransportError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        await asyncio.sleep(interval)


def license_issued(customer_id: str | None = None, *, plan: str = "starter") -> LicenseIssued:
    """A realistic LicenseIssued event (the JWT is opaque to projections)."""
    issued = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    return LicenseIssued(
        customer_id=customer_id or str(uuid.uuid4()),
        license_id=str(uuid.uuid4()),
        jwt="eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl",
        kid="k1",
        plan=plan,  # type: ignore[arg-type]
        issued_at=issued,
        expires_at=issued + timedelta(days=14),
        features=Features(
            maxDevices=10, dataRetentionDays=90, alerting=True, apiAccess=True, webhooks=False
        ),
        limits=Limits(mqttMessagesPerDay=100_000, apiRequestsPerDay=10_000),
        license_type="trial_signup",
        reason="test",
    )


@contextlib.asynccontextmanager
async def serving(app: Litestar, port: int | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """The app served by uvicorn on ``port`` (a free one by default) in this event loop, and a
    client for it."""
    from libs.embedded import free_port
    from services.cli import server_config

    port = port or free_port()
    # The configuration production runs with (no X-Forwarded-For believed by uvicorn).
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, "warning"))
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: asyncio.sleep(0, server.started), what="uvicorn started")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        await task


async def publish_license_and_wait(nats_url: str, database_url: str, expected: int = 1) -> None:
    """Put a LicenseIssued on a running platform's log and wait until licensing projected it."""
    from libs.eventstore import EventStore
    from libs.runtime import connect_nats

    nc = await connect_nats(nats_url)
    try:
        settings = ServiceSettings(database_url=database_url, nats_url=nats_url)
        event = license_issued()
        await EventStore(nc.jetstream(), settings).publish(event, customer_id=event.customer_id)
    finally:
        await nc.close()
    conn = await asyncpg.connect(database_url)
    try:
        await eventually(
            lambda: conn.fetchval("SELECT count(*) FROM licensing.licenses"),
            lambda n: n == expected,
            what="the license projected",
        )
    finally:
        await conn.close()


async def assert_replays_clean(
    database_url: str, store: Any, services: Sequence[ServiceDefinition]
) -> None:
    """`iotistic replay <service> --verify` finds no difference for each of ``services``."""
    from libs.replay import replay_service

    conn = await asyncpg.connect(database_url)
    try:
        for service in services:
            report = await replay_service(
                conn,
                store,
                schema=service.schema,
                migrations_package=service.migrations_package,
                projections=service.projections,
                verify=True,
            )
            assert report.differences == 0, (service.name, report.diffs)
            assert report.events_applied > 0, service.name
    finally:
        await conn.close()


def signed_license_issued(customer_id: str, *, plan: str = "starter") -> LicenseIssued:
    """A LicenseIssued whose JWT is really signed with the tests' license key, as licensing
    signs it, for instances that verify it against the JWKS."""
    from services.licensing.keys import LicenseSigner, load_keyring
    from services.licensing.reactors import signed_license

    now = datetime.now(UTC)
    return signed_license(
        LicenseSigner(load_keyring(Path(license_keys_dir()))),
        customer_id=customer_id,
        license_id=str(uuid.uuid4()),
        plan_name=plan,
        license_type="trial_signup",
        issued_at=now,
        expires_at=now + timedelta(days=14),
        grace_until=None,
        reason="test",
    )


def local_backend_settings(
    broker: Any, port: int, folder: Path, **extra: object
) -> dict[str, object]:
    """Settings for a platform whose provisioner runs instances here (the local backend),
    on ``broker`` (an EmbeddedMosquitto), with its HTTP app on ``port``."""
    return {
        "license_keys_dir": license_keys_dir(),
        "argon2_memory_kib": 8192,
        "argon2_time_cost": 1,
        "provisioner_secret": "p" * 40,
        "usage_secret": "u" * 40,
        "login_relay_secret": "r" * 40,
        "instance_usage_report_seconds": 1.0,
        "license_jwks_url": f"http://127.0.0.1:{port}/.well-known/jwks.json",
        "control_plane_url": f"http://127.0.0.1:{port}",
        "local_instances_dir": str(folder / "instances"),
        "local_ready_timeout_seconds": 30,
        "queue_retry_delay": 300,
        "queue_lease_seconds": 5,
        "mqtt_host": broker.host,
        "mqtt_port": broker.port,
        "mqtt_admin_username": broker.admin_username,
        "mqtt_admin_password": broker.admin_password,
        **SUITE_SIGNUP_LIMITS,
        **extra,
    }
