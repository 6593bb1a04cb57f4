"""Signup to a ready instance on the local backend: how long a new customer waits, and where.

The platform runs as `iotistic run --target all` in its own process with the local backend, an
embedded Mosquitto and the real argon2id cost, exporting its spans (and its instances') over
OTLP/HTTP to a receiver in this process; this process signs customers up one after the other
and times each from the signup request until the instance at ``instance_url`` answers
``/health/ready`` with the customer's license. Then it reads each journey's trace: the latency
of every hop (``tests/journey_steps.py``), the README's table.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from pathlib import Path

from libs.servers.mosquitto import EmbeddedMosquitto
from libs.servers.ports import free_port
from tests.journey_steps import (
    hop_table,
    hops,
    parts,
    platform_environment,
    running_platform,
    sign_up_until_healthy,
)
from tests.otlp_receiver import Receiver, otlp_receiver
from tests.support import create_database, license_keys_dir, nats_credentials_dir

CUSTOMERS = 20
# How long the last journey's spans get to reach the receiver after its instance is ready.
FLUSH_SECONDS = 3.0


async def run(pg_url: str, nats_url: str) -> None:
    with tempfile.TemporaryDirectory(prefix="iotistic-bench-provision-") as tmp:
        broker = EmbeddedMosquitto(Path(tmp) / "mosquitto")
        broker.start()
        try:
            with otlp_receiver() as receiver:
                await _measure(pg_url, nats_url, broker, Path(tmp), receiver)
        finally:
            broker.stop()


async def _measure(
    pg_url: str, nats_url: str, broker: EmbeddedMosquitto, tmp: Path, receiver: Receiver
) -> None:
    env = platform_environment(
        database_url=await create_database(pg_url),
        nats_url=nats_url,
        broker=broker,
        folder=tmp,
        port=free_port(),
        license_keys=license_keys_dir(),
        credentials_dir=nats_credentials_dir(),
        otlp_endpoint=receiver.endpoint,
    )
    async with running_platform(env) as client:
        journeys = [await sign_up_until_healthy(client) for _ in range(CUSTOMERS)]
        await asyncio.sleep(FLUSH_SECONDS)
    waits = [j.seconds for j in journeys]
    quantiles = statistics.quantiles(waits, n=20)
    print(
        f"provision: {CUSTOMERS} signups one after another on the local backend: signup to "
        f"instance ready p50 {statistics.median(waits):.2f} s, p95 {quantiles[18]:.2f} s, "
        f"max {max(waits):.2f} s"
    )
    spans = receiver.spans()
    requests = {
        s.trace_id
        for s in spans
        if s.kind == "SERVER" and s.name.startswith("POST /api/customers/signup")
    }
    traces = [[s for s in spans if s.trace_id == trace_id] for trace_id in requests]
    print(f"provision: latency per hop from {len(traces)} traces (ms):")
    print(hop_table([hops(trace) for trace in traces]))
    print("provision: the job's steps and the instance's first start, by span (ms):")
    print(hop_table([parts(trace) for trace in traces], "span"))
