"""An operator's worst day: the platform is killed (SIGKILL) in the middle of a deployment,
with tracing on. Started again, it runs the job's next attempt, and that attempt's spans are
still in the trace of the signup that asked for the job.

The deployment is held mid-way by the test: the instance's license keys come from the test's
own JWKS server, which answers only once the test lets it. The platform is killed while the
instance it started waits on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from journey_steps import JOB_SPAN, platform_environment, signup_trace
from litestar import Litestar, get
from otlp_receiver import ReceivedSpan, Receiver, otlp_receiver

from libs.servers.mosquitto import EmbeddedMosquitto
from libs.servers.ports import free_port
from support import (
    create_database,
    eventually,
    license_keys_dir,
    nats_credentials_dir,
    serving,
)

pytestmark = pytest.mark.slow


class HeldKeys:
    """The license's JWKS, answered only once ``opened``; ``asked`` once an instance asks."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.asked = asyncio.Event()

    def app(self) -> Litestar:
        from services.licensing.keys import load_keyring

        keyring = load_keyring(Path(license_keys_dir()))

        @get("/.well-known/jwks.json")
        async def jwks() -> dict[str, Any]:
            self.asked.set()
            await self.opened.wait()
            return keyring.jwks()

        return Litestar([jwks])


@contextlib.asynccontextmanager
async def platform(env: Mapping[str, str]) -> AsyncIterator[subprocess.Popen[bytes]]:
    """``iotistic run --target all``, ready; killed with SIGKILL if still running at the end."""
    iotistic = str(Path(sys.executable).parent / "iotistic")
    server = subprocess.Popen([iotistic, "run", "--target", "all"], env=dict(env))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{env['HTTP_PORT']}") as http:
            await eventually(
                lambda: _ready(http, server), lambda code: code == 200, timeout=60, what="ready"
            )
        yield server
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()


async def _ready(http: httpx.AsyncClient, server: subprocess.Popen[bytes]) -> int:
    if server.poll() is not None:
        raise RuntimeError(f"the platform exited with {server.returncode}")
    try:
        return (await http.get("/health/ready")).status_code
    except httpx.TransportError:
        return 0


async def _status(http: httpx.AsyncClient, token: str) -> str:
    me = await http.get("/api/customers/me", headers={"Authorization": f"Bearer {token}"})
    deployment: dict[str, Any] = me.json()["deployment"]
    return str(deployment["status"])


def _jobs(receiver: Receiver) -> list[ReceivedSpan]:
    return [s for s in receiver.spans() if s.name == JOB_SPAN]


async def test_a_job_cut_by_a_killed_platform_goes_on_in_its_causes_trace(
    postgres_server_url: str, nats_url: str, broker: EmbeddedMosquitto, tmp_path: Path
) -> None:
    keys = HeldKeys()
    with otlp_receiver() as receiver:
        async with serving(keys.app()) as keys_server:
            port = free_port()
            env = platform_environment(
                database_url=await create_database(postgres_server_url),
                nats_url=nats_url,
                broker=broker,
                folder=tmp_path,
                port=port,
                license_keys=license_keys_dir(),
                credentials_dir=nats_credentials_dir(),
                otlp_endpoint=receiver.endpoint,
            ) | {
                "LICENSE_JWKS_URL": str(keys_server.base_url).rstrip("/")
                + "/.well-known/jwks.json",
                # A killed worker's job is another's this soon.
                "QUEUE_LEASE_SECONDS": "3",
            }
            email, password = f"killed-{uuid.uuid4().hex}@example.com", "correct horse staple"
            async with platform(env) as first:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                    body = {"email": email, "password": password, "company_name": "Cut"}
                    assert (await http.post("/api/customers/signup", json=body)).status_code == 201
                await asyncio.wait_for(keys.asked.wait(), timeout=60)
                first.send_signal(signal.SIGKILL)
                first.wait()
            trace_id = await eventually(
                lambda: asyncio.sleep(0, receiver.spans()),
                lambda spans: any(s.name == "POST /api/customers/signup" for s in spans),
                what="the signup's span",
            )
            trace_id = signup_trace(trace_id)
            assert _jobs(receiver) == []  # the cut attempt's span never ended

            keys.opened.set()
            async with platform(env):
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                    login = await http.post(
                        "/api/customers/login", json={"email": email, "password": password}
                    )
                    token = login.json()["token"]
                    await eventually(
                        lambda: _status(http, token),
                        lambda status: status == "ready",
                        timeout=90,
                        what="the deployment done by the next attempt",
                    )
                [job] = await eventually(
                    lambda: asyncio.sleep(0, _jobs(receiver)), bool, what="the job's span"
                )
    assert job.attributes["iotistic.attempt"] >= 2
    assert job.trace_id == trace_id
    assert job.status_code != 2
    # Its steps and the instance it started are in the trace too.
    names = {s.name for s in receiver.trace(trace_id)}
    assert {"step health", "instance start", "apply DeploymentSucceeded"} <= names
