"""Helpers the tests share: settings on a private stream, fresh databases, bounded polling."""

from __future__ import annotations

import asyncio
import contextlib
import os
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
from libs.eventlog.bus_auth import Credentials, authorization_block, superuser
from libs.eventlog.connection import connect_nats
from libs.runtime.platform import Platform
from libs.runtime.service import ServiceDefinition

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


NATS_CREDENTIALS_ENV = "TEST_NATS_CREDENTIALS_DIR"
HARNESS_USER = "harness"
# The harness's server is thrown away after the run: a cheap bcrypt keeps connecting fast.
_HARNESS_BCRYPT_COST = 4


def harness_authorization(credentials: Credentials) -> str:
    """The ``authorization`` block of the harness's NATS: the control plane's users with their
    real permissions on any test stream (``T_*``, ``*.events``), and the harness's own user,
    allowed everything. Makes the passwords in ``credentials`` first."""
    from services.bus import bus_users

    users = [
        *bus_users(ServiceSettings(), stream="*", prefix="*.events"),
        superuser(HARNESS_USER),
    ]
    credentials.ensure(u.name for u in users)
    hashes = credentials.hashes([u.name for u in users], cost=_HARNESS_BCRYPT_COST)
    return authorization_block(users, hashes)


def start_harness_nats(folder: Path) -> Any:
    """The harness's NATS (an ``EmbeddedNats`` asking for credentials) started in ``folder``;
    its passwords' folder is published in ``TEST_NATS_CREDENTIALS_DIR``."""
    from libs.servers.nats import EmbeddedNats

    credentials = Credentials(folder / "credentials")
    server = EmbeddedNats(folder / "server", authorization=harness_authorization(credentials))
    server.start()
    os.environ[NATS_CREDENTIALS_ENV] = str(credentials.folder)
    return server


def nats_credentials_dir() -> str | None:
    """The folder of the harness's bus passwords, when its NATS asks for them."""
    return os.environ.get(NATS_CREDENTIALS_ENV) or None


async def connect_harness(nats_url: str, name: str = "tests") -> Any:
    """A NATS connection as the harness (allowed everything), or without credentials."""
    folder = nats_credentials_dir()
    if folder is None:
        return await connect_nats(nats_url, name=name)
    password = Credentials(Path(folder)).password(HARNESS_USER)
    return await connect_nats(nats_url, name=name, user=HARNESS_USER, password=password)


def make_settings(database_url: str, nats_url: str, **overrides: object) -> ServiceSettings:
    """Settings on a stream and subject space of their own, so tests never see each other."""
    tag = secrets.token_hex(4)
    values: dict[str, object] = {
        "database_url": database_url,
        "nats_url": nats_url,
        "nats_credentials_dir": nats_credentials_dir(),
        "events_stream": f"T_{tag.upper()}",
        "events_subject_prefix": f"t{tag}.events",
        "projection_ack_wait_seconds": 5,
        "admin_token": secrets.token_urlsafe(32),
        "session_secret": secrets.token_urlsafe(32),
        "data_keys_master_key": secrets.token_urlsafe(32),
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
    from libs.http.server import server_config
    from libs.servers.ports import free_port

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


async def publish_license_and_wait(
    nats_url: str, database_url: str, expected: int = 1, credentials_dir: str | None = None
) -> None:
    """Put a LicenseIssued on a running platform's log and wait until licensing projected it.

    With ``credentials_dir`` (a platform's bus passwords) it appends as licensing, the owner of
    LicenseIssued; otherwise as the harness.
    """
    from libs.eventlog.connection import connect_bus
    from libs.eventlog.store import EventStore

    settings = ServiceSettings(
        database_url=database_url, nats_url=nats_url, nats_credentials_dir=credentials_dir
    )
    if credentials_dir is None:
        nc = await connect_harness(nats_url)
    else:
        nc = await connect_bus(settings, "licensing")
    try:
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
    database_url: str,
    store: Any,
    services: Sequence[ServiceDefinition],
    *,
    rebuild: bool = False,
) -> None:
    """`iotistic replay <service> --verify` finds no difference for each of ``services``;
    with ``rebuild``, after `iotistic replay <service>` has rebuilt and swapped them in."""
    from libs.projections.replay import replay_service

    conn = await asyncpg.connect(database_url)
    try:
        for service in services:
            for verify in (False, True) if rebuild else (True,):
                report = await replay_service(
                    conn,
                    store,
                    schema=service.schema,
                    migrations_package=service.migrations_package,
                    projections=service.projections,
                    verify=verify,
                )
                assert report.differences == 0, (service.name, report.diffs)
                assert report.events_applied > 0, service.name
    finally:
        await conn.close()


def signed_license_issued(customer_id: str, *, plan: str = "starter") -> LicenseIssued:
    """A LicenseIssued whose JWT is really signed with the tests' license key, as licensing
    signs it, for instances that verify it against the JWKS."""
    from services.licensing.issuing import LicenseSigner, signed_license
    from services.licensing.keys import load_keyring

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


def local_platform(
    settings: ServiceSettings, broker: Any, port: int, folder: Path, **extra: object
) -> Platform:
    """The control plane with the local backend (``local_backend_settings``)."""
    from services.targets import CONTROL_PLANE

    return Platform.from_settings(
        settings,
        list(CONTROL_PLANE.values()),
        **local_backend_settings(broker, port, folder, **extra),
    )


def fill(folder: Path) -> None:
    """Write a file into ``folder`` until its disk is full."""
    with (folder / "filler").open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
