"""A customer's journey from signup to a healthy instance, on the real platform, traced.

Shared by the trace test (tests/e2e/test_journey_trace.py) and ``./dev bench journey``: the
platform runs as ``iotistic run --target all`` in its own process with the local backend and
sends its spans (and its instances' spans) to an OTLP receiver; ``hops`` reads one journey's
latency per hop off its trace.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from libs.servers.mosquitto import EmbeddedMosquitto

if TYPE_CHECKING:  # the bench imports this module as tests.journey_steps
    from otlp_receiver import ReceivedSpan

SIGNUP_SPAN = "POST /api/customers/signup"
JOB_SPAN = "job deploy-customer-stack"
# The moments a journey passes, each necessarily after the one before: (label, the span that
# marks it, and whether its start or its end does).
MILESTONES: tuple[tuple[str, str, str], ...] = (
    ("signup request", SIGNUP_SPAN, "start"),
    ("CustomerSignedUp applied", "apply CustomerSignedUp", "start"),
    ("LicenseIssued applied", "apply LicenseIssued", "start"),
    ("job started", JOB_SPAN, "start"),
    ("instance process started", "step instance", "start"),
    ("instance app starting", "instance start", "start"),
    ("instance healthy", JOB_SPAN, "end"),
)


def platform_environment(
    *,
    database_url: str,
    nats_url: str,
    broker: EmbeddedMosquitto,
    folder: Path,
    port: int,
    license_keys: str,
    credentials_dir: str | None,
    otlp_endpoint: str | None = None,
) -> dict[str, str]:
    """The environment of ``iotistic run --target all`` on the local backend, its instances
    on ``broker`` under ``folder``; with ``otlp_endpoint``, every span goes there."""
    tag = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "NATS_URL": nats_url,
        "NATS_CREDENTIALS_DIR": credentials_dir or "",
        "EVENTS_STREAM": f"JOURNEY_{tag.upper()}",
        "EVENTS_SUBJECT_PREFIX": f"journey{tag}.events",
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": str(port),
        "LICENSE_KEYS_DIR": license_keys,
        "SESSION_SECRET": uuid.uuid4().hex * 2,
        "DATA_KEYS_MASTER_KEY": uuid.uuid4().hex * 2,
        "ADMIN_TOKEN": uuid.uuid4().hex * 2,
        "PROVISIONER_SECRET": uuid.uuid4().hex * 2,
        "LICENSE_JWKS_URL": f"http://127.0.0.1:{port}/.well-known/jwks.json",
        "LOCAL_INSTANCES_DIR": str(folder / "instances"),
        "MQTT_HOST": broker.host,
        "MQTT_PORT": str(broker.port),
        "MQTT_ADMIN_USERNAME": broker.admin_username,
        "MQTT_ADMIN_PASSWORD": broker.admin_password,
        "LOG_LEVEL": "WARNING",
        # Every signup comes from 127.0.0.1: an operator's raised limits, not the defaults.
        "SIGNUP_MAX_PER_ADDRESS": "100000",
        "SIGNUP_MAX_PER_HOUR": "100000",
    }
    if otlp_endpoint is not None:
        env |= {
            "OTEL_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
            # Export within a fifth of a second, not the default five.
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }
    return env


@asynccontextmanager
async def running_platform(env: Mapping[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    """``iotistic run --target all`` until the block ends; a client on it once it is ready."""
    iotistic = str(Path(sys.executable).parent / "iotistic")
    server = subprocess.Popen([iotistic, "run", "--target", "all"], env=dict(env))
    try:
        base = f"http://127.0.0.1:{env['HTTP_PORT']}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            for _ in range(600):
                if server.poll() is not None:
                    raise RuntimeError(f"the platform exited with {server.returncode}")
                try:
                    if (await client.get("/health/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("the platform was not ready within a minute")
            yield client
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


@dataclass(frozen=True)
class Journey:
    """One customer signed up and served: their id, instance and how long it took."""

    customer_id: str
    instance_url: str
    seconds: float


async def sign_up_until_healthy(client: httpx.AsyncClient, timeout: float = 90) -> Journey:
    """Sign a new customer up and wait until their instance answers ready."""
    email = f"journey-{uuid.uuid4().hex}@example.com"
    password = "correct horse battery staple"
    started = time.perf_counter()
    signed = await client.post(
        "/api/customers/signup",
        json={"email": email, "password": password, "company_name": "Journey Air"},
    )
    if signed.status_code != 201:
        raise RuntimeError(f"signup failed: {signed.status_code} {signed.text}")
    login = await client.post("/api/customers/login", json={"email": email, "password": password})
    auth = {"Authorization": f"Bearer {login.json()['token']}"}
    while time.perf_counter() - started < timeout:
        me = (await client.get("/api/customers/me", headers=auth)).json()
        deployment = me["deployment"]
        if deployment["status"] == "ready" and deployment["instance_url"]:
            url = deployment["instance_url"]
            async with httpx.AsyncClient(timeout=2) as instance:
                if (await instance.get(f"{url}/health/ready")).status_code == 200:
                    seconds = time.perf_counter() - started
                    return Journey(me["customer"]["customer_id"], url, seconds)
        elif deployment["status"] == "failed":
            raise RuntimeError(f"deployment failed: {deployment}")
        await asyncio.sleep(0.05)
    raise RuntimeError(f"no healthy instance within {timeout:.0f} s")


def signup_trace(spans: list[ReceivedSpan]) -> str:
    """The trace id of the one signup request among ``spans``."""
    [request] = [s for s in spans if s.name.startswith(SIGNUP_SPAN) and s.kind == "SERVER"]
    return request.trace_id


def milestones(trace: list[ReceivedSpan]) -> dict[str, int]:
    """When (ns) a journey's trace passed each milestone it holds: the first span of each
    name that marks one."""
    found: dict[str, int] = {}
    for label, name, edge in MILESTONES:
        times = [
            s.start_ns if edge == "start" else s.end_ns
            for s in trace
            if s.name == name or (name == SIGNUP_SPAN and s.name.startswith(SIGNUP_SPAN))
        ]
        if times:
            found[label] = min(times)
    return found


def hops(trace: list[ReceivedSpan]) -> dict[str, float]:
    """Milliseconds from each milestone to the next one the trace holds, by "a → b", and
    from the first to the last."""
    passed = milestones(trace)
    labels = [label for label, _, _ in MILESTONES if label in passed]
    found = {f"{a} → {b}": (passed[b] - passed[a]) / 1e6 for a, b in itertools.pairwise(labels)}
    if len(labels) > 1:
        found[f"whole journey: {labels[0]} → {labels[-1]}"] = (
            passed[labels[-1]] - passed[labels[0]]
        ) / 1e6
    return found


def parts(trace: list[ReceivedSpan]) -> dict[str, float]:
    """Milliseconds each step of the job (``step <name>``) and each part of the instance's
    first start (``start <part>``) took, by span name."""
    return {
        s.name: s.duration_ms
        for s in trace
        if s.name.startswith(("step ", "start ")) or s.name == "instance start"
    }


def hop_table(journeys: list[dict[str, float]], what: str = "hop") -> str:
    """A Markdown table of each hop's median and 95th percentile over ``journeys``."""
    rows = [f"| {what} | p50 ms | p95 ms |", "|---|---:|---:|"]
    for hop in dict.fromkeys(name for journey in journeys for name in journey):
        values = sorted(j[hop] for j in journeys if hop in j)
        p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
        rows.append(f"| {hop} | {statistics.median(values):.0f} | {p95:.0f} |")
    return "\n".join(rows)
