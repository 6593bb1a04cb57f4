"""The platform as a newcomer and an operator meet it: `iotistic up`, `iotistic run`, health.

These start the real command in a subprocess and talk to it over HTTP; the Postgres and NATS
servers here belong to the test, because the test stops and starts them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from libs.servers.nats import EmbeddedNats
from libs.servers.ports import free_port
from libs.servers.postgres import EmbeddedPostgres
from support import eventually, license_keys_dir, publish_license_and_wait

pytestmark = pytest.mark.slow

IOTISTIC = str(Path(sys.executable).parent / "iotistic")
SIGNUP = {"email": "outage@example.com", "password": "a long passphrase", "company_name": "X"}


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def ready_status(client: httpx.AsyncClient) -> int:
    return (await client.get("/health/ready", timeout=5)).status_code


async def wait_status(client: httpx.AsyncClient, status: int, timeout: float = 60) -> None:
    await eventually(
        lambda: ready_status(client),
        lambda s: s == status,
        timeout=timeout,
        interval=0.2,
        what=f"/health/ready {status}",
    )


def run_env(
    postgres: EmbeddedPostgres, nats_server: EmbeddedNats, port: int, token: str
) -> dict[str, str]:
    """Environment for `iotistic run` against the test's own servers."""
    return {
        **os.environ,
        "DATABASE_URL": postgres.create_database("iotistic"),
        "NATS_URL": nats_server.url,
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": str(port),
        "ADMIN_TOKEN": token,
        "SESSION_SECRET": "s" * 40,
        "DATA_KEYS_MASTER_KEY": "k" * 40,
        "LICENSE_KEYS_DIR": license_keys_dir(),
        "LOG_LEVEL": "WARNING",
    }


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[EmbeddedPostgres, EmbeddedNats]]:
    postgres = EmbeddedPostgres(tmp_path / "pg")
    nats_server = EmbeddedNats(tmp_path / "nats")
    postgres.start()
    nats_server.start()
    yield postgres, nats_server
    nats_server.stop()
    postgres.stop()


async def test_health_follows_postgres_and_nats_without_a_restart(servers) -> None:
    postgres, nats_server = servers
    port = free_port()
    token = "a" * 40
    env = run_env(postgres, nats_server, port, token)
    proc = subprocess.Popen([IOTISTIC, "run", "--target", "all"], env=env)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await eventually(
                lambda: client.get("/health/live"), lambda r: r.status_code == 200, what="live"
            )
            await wait_status(client, 200)
            body = (await client.get("/health/ready")).json()
            assert body["status"] == "ready"
            assert set(body["services"]) == {"signup", "licensing", "billing", "provisioner"}
            for service in body["services"].values():
                assert service["database"] == {"ok": True}
                assert all(p["attached"] for p in service["projections"].values())

            postgres.stop()
            await wait_status(client, 503)
            body = (await client.get("/health/ready")).json()
            assert body["services"]["licensing"]["database"]["ok"] is False
            assert (await client.get("/health/live")).status_code == 200
            signup = await client.post("/api/customers/signup", json=SIGNUP)
            assert signup.status_code == 503
            assert signup.json()["error"]["code"] == "unavailable"
            postgres.start()
            await wait_status(client, 200)

            nats_server.stop()
            await wait_status(client, 503)
            assert (await client.get("/health/ready")).json()["nats"]["ok"] is False
            signup = await client.post("/api/customers/signup", json=SIGNUP)
            assert signup.status_code == 503
            assert "Traceback" not in signup.text
            nats_server.start()
            await wait_status(client, 200)

            # The same process still does its work after both outages.
            await publish_license_and_wait(nats_server.url, env["DATABASE_URL"])
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


async def test_http_surface_metrics_openapi_errors_and_admin(servers) -> None:
    postgres, nats_server = servers
    port = free_port()
    token = "b" * 40
    env = run_env(postgres, nats_server, port, token)
    proc = subprocess.Popen([IOTISTIC, "run", "--target", "licensing"], env=env)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await wait_status(client, 200)
            body = (await client.get("/health")).json()
            assert set(body["services"]) == {"licensing"}

            metrics = await client.get("/metrics")
            assert metrics.status_code == 200
            assert metrics.headers["content-type"].startswith("text/plain")
            assert "iotistic_projection_apply_seconds" in metrics.text

            openapi = (await client.get("/schema/openapi.json")).json()
            assert "/health/ready" in openapi["paths"]
            # The event log's catalogue is served next to it, by every control-plane process.
            asyncapi = await client.get("/schema/asyncapi.json")
            assert asyncapi.status_code == 200
            assert asyncapi.headers["content-type"].startswith("application/json")
            assert asyncapi.json()["asyncapi"] == "3.0.0"
            assert "LicenseIssued" in asyncapi.json()["channels"]

            missing = await client.get("/no/such/route")
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "not_found"
            assert "Traceback" not in missing.text

            assert (await client.get("/api/admin/projections")).status_code == 401
            wrong = await client.get(
                "/api/admin/projections", headers={"Authorization": "Bearer " + "c" * 40}
            )
            assert wrong.status_code == 401
            admin = await client.get(
                "/api/admin/projections", headers={"Authorization": f"Bearer {token}"}
            )
            assert admin.status_code == 200
            assert admin.json()["parked"] == {"licensing": []}
            bad = await client.post(
                "/api/admin/projections/licensing/licenses/parked/5/explode",
                headers={"Authorization": f"Bearer {token}"},
            )
            assert bad.status_code == 400
            assert "Traceback" not in bad.text
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def test_run_refuses_bad_configuration_naming_the_variable() -> None:
    env = {**os.environ, "NATS_URL": "http://wrong", "HTTP_PORT": "not-a-port"}
    result = subprocess.run(
        [IOTISTIC, "run", "--target", "all"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "NATS_URL" in result.stderr or "HTTP_PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_commands_report_an_unreachable_server_without_a_traceback() -> None:
    env = {**os.environ, "NATS_URL": f"nats://127.0.0.1:{free_port()}"}
    result = subprocess.run(
        [IOTISTIC, "--data-dir", "/nonexistent", "events", "stats"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "no servers available" in result.stderr
    assert "Traceback" not in result.stderr


async def test_up_brings_everything_up_and_keeps_data_across_restarts(tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    command = [IOTISTIC, "--data-dir", str(data_dir), "up", "--port", str(port)]
    env = {**os.environ, "LOG_LEVEL": "WARNING"}
    for key in ("DATABASE_URL", "NATS_URL"):
        env.pop(key, None)

    async def start_and_wait() -> tuple[subprocess.Popen[bytes], dict[str, str]]:
        proc = subprocess.Popen(command, env=env)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await wait_status(client, 200, timeout=120)
        runtime = json.loads((data_dir / "runtime.json").read_text())
        return proc, runtime

    def stop(proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0

    proc, runtime = await start_and_wait()
    try:
        pg_port = int(runtime["DATABASE_URL"].rsplit(":", 1)[1].split("/")[0])
        nats_port = int(runtime["NATS_URL"].rsplit(":", 1)[1])
        assert 5432 not in (pg_port, nats_port) and 4222 not in (pg_port, nats_port)
        token_file = data_dir / "secrets" / "admin-token"
        assert token_file.stat().st_mode & 0o077 == 0
        await publish_license_and_wait(
            runtime["NATS_URL"],
            runtime["DATABASE_URL"],
            credentials_dir=runtime["NATS_CREDENTIALS_DIR"],
        )
        # A second `up` on the same folder is refused before it touches anything: the first
        # keeps its servers and the runtime file the tools find it by.
        second = subprocess.run(
            [IOTISTIC, "--data-dir", str(data_dir), "up", "--port", str(free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 1
        assert "already runs" in second.stdout + second.stderr
        assert json.loads((data_dir / "runtime.json").read_text()) == runtime
    finally:
        stop(proc)
    assert not (data_dir / "runtime.json").exists()
    assert not listening(pg_port) and not listening(nats_port) and not listening(port)

    proc, runtime = await start_and_wait()
    try:
        conn = await asyncpg.connect(runtime["DATABASE_URL"])
        try:
            assert await conn.fetchval("SELECT count(*) FROM licensing.licenses") == 1
        finally:
            await conn.close()
        stats = subprocess.run(
            [IOTISTIC, "--data-dir", str(data_dir), "events", "stats", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        by_type = json.loads(stats.stdout)["by_type"]
        # The license asked the provisioner for an instance (whose deployment then runs).
        assert (by_type["LicenseIssued"], by_type["DeploymentRequested"]) == (1, 1)
    finally:
        stop(proc)
