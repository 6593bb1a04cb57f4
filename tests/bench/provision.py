"""Signup to a ready instance on the local backend: how long a new customer waits.

The platform runs as `iotistic run --target all` in its own process with the local backend, an
embedded Mosquitto and the real argon2id cost; this process signs customers up one after the
other and times each from the signup request until the instance at ``instance_url`` answers
``/health/ready`` with the customer's license.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from libs.servers.mosquitto import EmbeddedMosquitto
from libs.servers.ports import free_port
from tests.support import create_database, license_keys_dir, nats_credentials_dir

CUSTOMERS = 20


async def run(pg_url: str, nats_url: str) -> None:
    with tempfile.TemporaryDirectory(prefix="iotistic-bench-provision-") as tmp:
        broker = EmbeddedMosquitto(Path(tmp) / "mosquitto")
        broker.start()
        try:
            await _measure(pg_url, nats_url, broker, Path(tmp))
        finally:
            broker.stop()


async def _measure(pg_url: str, nats_url: str, broker: EmbeddedMosquitto, tmp: Path) -> None:
    port = free_port()
    tag = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "DATABASE_URL": await create_database(pg_url),
        "NATS_URL": nats_url,
        "NATS_CREDENTIALS_DIR": nats_credentials_dir() or "",
        "EVENTS_STREAM": f"BENCH_{tag.upper()}",
        "EVENTS_SUBJECT_PREFIX": f"bench{tag}.events",
        "HTTP_HOST": "127.0.0.1",
        "HTTP_PORT": str(port),
        "LICENSE_KEYS_DIR": license_keys_dir(),
        "SESSION_SECRET": uuid.uuid4().hex * 2,
        "DATA_KEYS_MASTER_KEY": uuid.uuid4().hex * 2,
        "ADMIN_TOKEN": uuid.uuid4().hex * 2,
        "PROVISIONER_SECRET": uuid.uuid4().hex * 2,
        "LICENSE_JWKS_URL": f"http://127.0.0.1:{port}/.well-known/jwks.json",
        "LOCAL_INSTANCES_DIR": str(tmp / "instances"),
        "MQTT_HOST": broker.host,
        "MQTT_PORT": str(broker.port),
        "MQTT_ADMIN_USERNAME": broker.admin_username,
        "MQTT_ADMIN_PASSWORD": broker.admin_password,
        "LOG_LEVEL": "WARNING",
        # Every signup comes from 127.0.0.1: an operator's raised limits, not the defaults.
        "SIGNUP_MAX_PER_ADDRESS": "100000",
        "SIGNUP_MAX_PER_HOUR": "100000",
    }
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "iotistic"), "run", "--target", "all"], env=env
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for _ in range(300):
                try:
                    if (await client.get("/health/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            waits = [await _one(client) for _ in range(CUSTOMERS)]
    finally:
        server.terminate()
        server.wait(timeout=60)
    quantiles = statistics.quantiles(waits, n=20)
    print(
        f"provision: {CUSTOMERS} signups one after another on the local backend: signup to "
        f"instance ready p50 {statistics.median(waits):.2f} s, p95 {quantiles[18]:.2f} s, "
        f"max {max(waits):.2f} s"
    )


async def _one(client: httpx.AsyncClient) -> float:
    email = f"bench-{uuid.uuid4().hex}@example.com"
    password = "correct horse battery staple"
    started = time.perf_counter()
    signed = await client.post(
        "/api/customers/signup",
        json={"email": email, "password": password, "company_name": "Benchmark Air"},
    )
    if signed.status_code != 201:
        raise RuntimeError(f"signup failed: {signed.status_code} {signed.text}")
    token = (
        await client.post("/api/customers/login", json={"email": email, "password": password})
    ).json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    while time.perf_counter() - started < 60:
        deployment = (await client.get("/api/customers/me", headers=auth)).json()["deployment"]
        if deployment["status"] == "ready" and deployment["instance_url"]:
            async with httpx.AsyncClient(timeout=2) as instance:
                ready = await instance.get(f"{deployment['instance_url']}/health/ready")
            if ready.status_code == 200:
                return time.perf_counter() - started
        elif deployment["status"] == "failed":
            raise RuntimeError(f"deployment failed: {deployment}")
        await asyncio.sleep(0.02)
    raise RuntimeError("no instance within 60 s")
