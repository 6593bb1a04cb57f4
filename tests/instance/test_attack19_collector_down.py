"""An operator's worst day: the OTLP collector is down. A customer's instance exporting its
spans to a collector that refuses connections, or accepts them and never answers, still
becomes ready, and still stops by itself within the stop timeout of the local backend (its
SIGTERM, then SIGKILL 10 s later): its last spans wait a bounded time at exit, not OTLP's
10 s per batch."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from litestar import Litestar, get

from libs.servers.ports import free_port
from services.provisioner.backends.local.processes import terminate_pid
from support import (
    create_database,
    eventually,
    license_keys_dir,
    serving,
    signed_license_issued,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def collector(behaviour: str) -> Iterator[str]:
    """The URL of a collector that ``refuses`` connections or ``hangs`` (accepts, never
    answers)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    if behaviour == "refuses":
        listener.close()
        yield url
        return
    listener.listen(64)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield url
    finally:
        listener.close()
        for connection in accepted:
            connection.close()


def jwks_app() -> Litestar:
    """The control plane's part the instance needs to become ready: its license's keys."""
    from services.licensing.keys import load_keyring

    keyring = load_keyring(Path(license_keys_dir()))

    @get("/.well-known/jwks.json", sync_to_thread=False)
    def jwks() -> dict[str, object]:
        return keyring.jwks()

    return Litestar([jwks])


async def _ready(http: httpx.AsyncClient) -> int:
    try:
        return (await http.get("/health/ready")).status_code
    except httpx.HTTPError:
        return 0


@pytest.mark.parametrize("behaviour", ["hangs", "refuses"])
async def test_an_instance_stops_in_time_while_its_collector_is_down(
    postgres_server_url: str, behaviour: str, tmp_path: Path
) -> None:
    async with serving(jwks_app()) as control:
        with collector(behaviour) as endpoint:
            await _start_and_stop(postgres_server_url, str(control.base_url), endpoint, tmp_path)


async def _start_and_stop(
    postgres_server_url: str, control: str, endpoint: str, folder: Path
) -> None:
    customer_id = str(uuid.uuid4())
    port = free_port()
    environment = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "INSTANCE_CUSTOMER_ID": customer_id,
        "DATABASE_URL": await create_database(postgres_server_url),
        "LICENSE_JWT": signed_license_issued(customer_id).jwt,
        "LICENSE_JWKS_URL": f"{control.rstrip('/')}/.well-known/jwks.json",
        "CONTROL_PLANE_URL": control,
        "OTEL_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        # Its first start's spans are all still to send when it is told to stop.
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
        "TRACEPARENT": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "HTTP_PORT": str(port),
    }
    # The shell keeps how the instance ended: whatever reaps this test's children may not.
    pid_file, status_file = folder / "pid", folder / "status"
    script = f'"$0" -m services.instance & echo $! > {pid_file}; wait $!; echo $? > {status_file}'
    shell = await asyncio.create_subprocess_exec(
        "sh", "-c", script, sys.executable, env=environment, cwd=ROOT
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            await eventually(
                lambda: _ready(http), lambda code: code == 200, timeout=60, what="ready"
            )
        # What the local backend does to stop an instance: SIGTERM, SIGKILL after 10 s.
        await terminate_pid(int(pid_file.read_text()))
        status = await eventually(
            lambda: asyncio.sleep(0, status_file.read_text().strip()),
            bool,
            what="the instance's exit status",
        )
    finally:
        if shell.returncode is None:
            shell.kill()
    # 0: it stopped by itself; 137 would be the backend's SIGKILL.
    assert status == "0"
