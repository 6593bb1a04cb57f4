"""The embedded servers are real: they keep data across stop, start and kill, on stable ports."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.js.api import StorageType

from libs.servers.nats import NATS_MIN_VERSION, EmbeddedNats
from libs.servers.ports import free_port
from libs.servers.postgres import EmbeddedPostgres
from libs.servers.process import EmbeddedServerError

STANDARD_PORTS = {4222, 5432, 8222}


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres(tmp_path / "pg" / "data") as server:
        yield server


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    with EmbeddedNats(tmp_path / "nats") as server:
        yield server


async def fetch_readings(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        return [
            row["sensor"] for row in await conn.fetch("SELECT sensor FROM readings ORDER BY id")
        ]
    finally:
        await conn.close()


async def write_reading(url: str, sensor: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS readings (id serial PRIMARY KEY, sensor text NOT NULL)"
        )
        await conn.execute("INSERT INTO readings (sensor) VALUES ($1)", sensor)
    finally:
        await conn.close()


async def message_count(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(stream)
        return info.state.messages
    finally:
        await nc.close()


async def test_postgres_keeps_rows_across_stop_and_start_on_the_same_port(
    postgres: EmbeddedPostgres,
) -> None:
    url, port = postgres.url, postgres.port
    await write_reading(url, "bme688-1")

    postgres.stop()
    assert not postgres.is_running
    postgres.stop()  # idempotent
    postgres.start()

    assert postgres.port == port
    assert postgres.url == url
    assert await fetch_readings(url) == ["bme688-1"]


async def test_postgres_create_database_returns_a_url_that_connects_and_is_idempotent(
    postgres: EmbeddedPostgres,
) -> None:
    url = postgres.create_database("tenant's data")

    assert postgres.create_database("tenant's data") == url
    await write_reading(url, "in-tenant-db")
    assert await fetch_readings(url) == ["in-tenant-db"]


async def test_postgres_kill_takes_backends_down_and_recovers_committed_rows(
    postgres: EmbeddedPostgres,
) -> None:
    await write_reading(postgres.url, "before-crash")
    # An open session with uncommitted work: its backend must die with the server.
    conn = await asyncpg.connect(postgres.url)
    backend = await conn.fetchval("SELECT pg_backend_pid()")
    await conn.execute("BEGIN; INSERT INTO readings (sensor) VALUES ('uncommitted')")

    postgres.kill()
    conn.terminate()

    assert not postgres.is_running
    assert proc_state(backend) in ("gone", "Z")
    postgres.start()
    assert await fetch_readings(postgres.url) == ["before-crash"]
    assert "automatic recovery in progress" in postgres.log_path.read_text()


def proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return "gone"


async def test_nats_stream_and_messages_survive_stop_and_start(nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name="READINGS", subjects=["readings.>"], storage=StorageType.FILE)
    for n in range(3):
        await js.publish("readings.bme688", f"reading {n}".encode())
    await nc.close()
    port = nats_server.port

    nats_server.stop()
    assert not nats_server.is_running
    nats_server.stop()  # idempotent
    nats_server.start()

    assert nats_server.port == port
    assert await message_count(nats_server.url, "READINGS") == 3


async def test_nats_keeps_acknowledged_messages_after_a_kill(nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name="EVENTS", subjects=["events.>"], storage=StorageType.FILE)
    await js.publish("events.signup", b"acknowledged")
    await nc.close()

    nats_server.kill()
    nats_server.start()

    assert await message_count(nats_server.url, "EVENTS") == 1


def test_nats_fsyncs_every_write_and_is_recent_enough(nats_server: EmbeddedNats) -> None:
    assert "sync_interval: always" in nats_server.config_path.read_text()
    with urllib.request.urlopen(f"{nats_server.monitor_url}/varz") as response:  # noqa: S310
        varz = json.load(response)

    assert varz["jetstream"]["config"]["sync_always"] is True
    version = tuple(int(part) for part in EmbeddedNats.version().split("-")[0].split("."))
    assert version >= NATS_MIN_VERSION
    assert varz["version"] == EmbeddedNats.version()


async def test_two_of_each_run_side_by_side_off_the_standard_ports(tmp_path: Path) -> None:
    with (
        EmbeddedPostgres(tmp_path / "pg-a") as pg_a,
        EmbeddedPostgres(tmp_path / "pg-b") as pg_b,
        EmbeddedNats(tmp_path / "nats-a") as nats_a,
        EmbeddedNats(tmp_path / "nats-b") as nats_b,
    ):
        ports = [pg_a.port, pg_b.port, nats_a.port, nats_a.monitor_port]
        ports += [nats_b.port, nats_b.monitor_port]
        assert len(set(ports)) == len(ports)
        assert not STANDARD_PORTS & set(ports)

        await write_reading(pg_a.url, "a")
        await write_reading(pg_b.url, "b")
        assert await fetch_readings(pg_a.url) == ["a"]
        assert await fetch_readings(pg_b.url) == ["b"]
        for server in (nats_a, nats_b):
            nc = await nats.connect(server.url)
            try:
                info = await nc.jetstream().account_info()
                assert info.streams == 0
            finally:
                await nc.close()


def test_a_port_another_server_holds_fails_start_with_the_servers_own_words(
    postgres: EmbeddedPostgres, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    # The server already there would answer readiness probes; start must not take it for ours.
    with pytest.raises(EmbeddedServerError, match="could not create any TCP/IP sockets"):
        EmbeddedPostgres(tmp_path / "second-pg" / "data", port=postgres.port).start()
    with pytest.raises(EmbeddedServerError, match="address already in use"):
        EmbeddedNats(tmp_path / "second-nats", port=nats_server.port).start()


def test_free_port_never_repeats_an_answer() -> None:
    ports = [free_port() for _ in range(50)]

    assert len(set(ports)) == len(ports)
    assert not STANDARD_PORTS & set(ports)


async def refused_without_password(server: EmbeddedPostgres) -> bool:
    try:
        conn = await asyncpg.connect(server.shown_url)
    except asyncpg.InvalidAuthorizationSpecificationError:
        return True
    except asyncpg.InvalidPasswordError:
        return True
    await conn.close()
    return False


async def test_postgres_asks_every_connection_for_the_password_kept_owner_only(
    postgres: EmbeddedPostgres, caplog: pytest.LogCaptureFixture
) -> None:
    assert await refused_without_password(postgres)
    wrong = postgres.url.replace(postgres.password, "not-the-password")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(wrong)
    await write_reading(postgres.url, "with the password")
    assert postgres.password_file.stat().st_mode & 0o777 == 0o600
    assert postgres.password not in caplog.text


async def test_a_cluster_made_with_trust_gets_a_password_at_its_next_start(
    tmp_path: Path,
) -> None:
    server = EmbeddedPostgres(tmp_path / "pg" / "data")
    server.start()
    try:
        await write_reading(server.url, "before")
    finally:
        server.stop()
    # As the earlier version made it: anyone on the machine could connect without one.
    (server.data_dir / "pg_hba.conf").write_text(
        "local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n"
    )
    server.password_file.unlink()
    server.start()
    try:
        assert await refused_without_password(server)
        assert await fetch_readings(server.url) == ["before"]
    finally:
        server.stop()


def test_a_monitor_port_taken_before_start_is_chosen_again(tmp_path: Path) -> None:
    import socket

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        server = EmbeddedNats(tmp_path / "nats", monitor_port=taken)
        server.start()
        try:
            assert server.monitor_port != taken
            with urllib.request.urlopen(f"{server.monitor_url}/healthz", timeout=5) as answer:  # noqa: S310
                assert answer.status == 200
        finally:
            server.stop()
