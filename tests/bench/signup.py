"""Signups per second and their latency, next to the limit password hashing sets.

The platform runs as `iotistic run --target all` in its own process (as in production, so the
load generator does not share its event loop), with the real argon2id cost; this process sends
signups over HTTP from a fixed number of concurrent clients.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from libs.config import load_settings
from libs.servers.ports import free_port
from services.signup.settings import SignupSettings
from tests.support import create_database, license_keys_dir, nats_credentials_dir

SIGNUPS = 400
CONCURRENCY = 8


def hash_limit() -> tuple[float, int, str]:
    """argon2id hashes per second on one core at the configured cost (ARGON2_* from the
    environment, as the server takes them), the cores, and the cost."""
    defaults = load_settings(SignupSettings)
    from argon2 import PasswordHasher, Type

    hasher = PasswordHasher(
        memory_cost=defaults.argon2_memory_kib,
        time_cost=defaults.argon2_time_cost,
        parallelism=defaults.argon2_parallelism,
        type=Type.ID,
    )
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < 2.0:
        hasher.hash("benchmark password")
        count += 1
    cost = (
        f"{defaults.argon2_memory_kib // 1024} MiB, t={defaults.argon2_time_cost}, "
        f"p={defaults.argon2_parallelism}"
    )
    return count / (time.perf_counter() - started), os.cpu_count() or 1, cost


async def run(pg_url: str, nats_url: str) -> None:
    per_core, cores, cost = hash_limit()
    limit = per_core * cores
    print(
        f"signup: argon2id ({cost}) {per_core:,.1f} hashes/s per core x {cores} "
        f"cores = limit {limit:,.0f} signups/s"
    )
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
            for _ in range(200):
                try:
                    if (await client.get("/health/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            await measure(client, limit, warmup=True)
            await measure(client, limit, warmup=False)
    finally:
        server.terminate()
        server.wait(timeout=30)


async def measure(client: httpx.AsyncClient, limit: float, *, warmup: bool) -> None:
    total = CONCURRENCY * 5 if warmup else SIGNUPS
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    latencies: list[float] = []
    complete = 0

    async def worker() -> None:
        nonlocal complete
        while not queue.empty():
            queue.get_nowait()
            body = {
                "email": f"bench-{uuid.uuid4().hex}@example.com",
                "password": "correct horse battery staple",
                "company_name": "Benchmark Air",
            }
            started = time.perf_counter()
            response = await client.post("/api/customers/signup", json=body)
            latencies.append(time.perf_counter() - started)
            if response.status_code != 201:
                raise RuntimeError(f"signup failed: {response.status_code} {response.text}")
            if response.json()["license"]["status"] == "active":
                complete += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - started
    if warmup:
        return
    rate = total / elapsed
    quantiles = statistics.quantiles(latencies, n=100)
    print(
        f"signup: {total} signups, {CONCURRENCY} concurrent clients: {rate:,.1f}/s "
        f"({rate / limit:.0%} of the hash limit), p50 {quantiles[49] * 1000:.0f} ms, "
        f"p99 {quantiles[98] * 1000:.0f} ms; {complete} answered with their license"
    )
