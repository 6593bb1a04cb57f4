"""Fleet provisioning and the original agent's wire format, on one instance.

``fleet``: an ``iotistic run --target instance`` process with an enterprise license (500
devices) that administers its broker. A provisioning key (made in its database, as the API
would) registers ``REGISTRATIONS`` devices through ``POST /api/v1/device/register``,
``CONCURRENCY`` at a time, each followed by its key exchange: the figures are registrations per
second and the latency of one registration. Then ``PUBLISHERS`` of those devices publish
readings batches in the original format (``BATCH`` readings a batch, QoS 1) with their own
credentials, as fast as the broker takes them: the figure is readings stored per second, and
whether any was lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from libs.servers.mosquitto import EmbeddedMosquitto
from libs.servers.ports import free_port
from tests.bench.instance import _license, _rss_mib, _stored, _write
from tests.support import create_database, license_keys_dir, serving

REGISTRATIONS = 200
CONCURRENCY = 50
PUBLISHERS = 20
BATCH = 50
BATCHES_EACH = 200  # 20 devices x 200 batches x 50 readings = 200,000 readings


def _batch_lines(count: int, first_ms: int) -> bytes:
    """``count`` batches of ``BATCH`` readings, one JSON document a line, 1 ms apart."""
    lines = []
    for b in range(count):
        start = first_ms + b * BATCH
        messages = [
            {
                "sensor_name": "bme688",
                "temperature": 20.0 + (i % 50) / 10,
                "humidity": 40.0,
                "pressure": 101000.0,
                "gas_resistance": 120000.0,
                "timestamp": datetime.fromtimestamp((start + i) / 1000, UTC).isoformat(
                    timespec="milliseconds"
                ),
            }
            for i in range(BATCH)
        ]
        batch = {"sensor": "bme688", "timestamp": messages[-1]["timestamp"], "messages": messages}
        lines.append(json.dumps(batch, separators=(",", ":")).encode() + b"\n")
    return b"".join(lines)


async def _register(
    http: httpx.AsyncClient, key: str, gate: asyncio.Semaphore
) -> tuple[float, dict[str, Any]]:
    async with gate:
        device_uuid, api_key = str(uuid.uuid4()), secrets.token_urlsafe(24)
        started = time.perf_counter()
        answer = await http.post(
            "/api/v1/device/register",
            headers={"Authorization": f"Bearer {key}"},
            json={
                "uuid": device_uuid,
                "deviceName": f"sensor {device_uuid[:8]}",
                "deviceType": "bme688",
                "deviceApiKey": api_key,
            },
        )
        answer.raise_for_status()
        exchanged = await http.post(
            f"/api/v1/device/{device_uuid}/key-exchange",
            headers={"Authorization": f"Bearer {api_key}"},
        )
        exchanged.raise_for_status()
        return time.perf_counter() - started, answer.json()


async def _registrations(http: httpx.AsyncClient, key: str) -> tuple[str, list[dict[str, Any]]]:
    gate = asyncio.Semaphore(CONCURRENCY)
    started = time.perf_counter()
    results = await asyncio.gather(*(_register(http, key, gate) for _ in range(REGISTRATIONS)))
    elapsed = time.perf_counter() - started
    latencies = sorted(seconds for seconds, _ in results)
    p95 = latencies[int(len(latencies) * 0.95) - 1]
    figure = (
        f"fleet, registration: {REGISTRATIONS} devices registered and key-exchanged, "
        f"{CONCURRENCY} at a time, in {elapsed:.1f} s = {REGISTRATIONS / elapsed:.1f}/s; one "
        f"takes {statistics.median(latencies) * 1000:.0f} ms (median), "
        f"{p95 * 1000:.0f} ms (95th percentile) under that load"
    )
    return figure, [registered for _, registered in results]


def _publisher(broker: EmbeddedMosquitto, device: dict[str, Any]) -> subprocess.Popen[bytes]:
    mqtt = device["mqtt"]
    return subprocess.Popen(
        [
            *("mosquitto_pub", "-h", broker.host, "-p", str(broker.port)),
            *("-u", mqtt["username"], "-P", mqtt["password"], "-i", mqtt["clientId"]),
            *("-q", "1", "-M", "100", "-t", f"iot/device/{device['uuid']}/sensor/bme688", "-l"),
        ],
        stdin=subprocess.PIPE,
    )


async def _original_ingest(
    conn: asyncpg.Connection, broker: EmbeddedMosquitto, devices: list[dict[str, Any]]
) -> str:
    base = await _stored(conn)
    expected = len(devices) * BATCHES_EACH * BATCH
    first_ms = int(time.time() * 1000) - 3_600_000
    chunks = [
        _batch_lines(BATCHES_EACH, first_ms + index * BATCHES_EACH * BATCH)
        for index in range(len(devices))
    ]
    publishers = [_publisher(broker, device) for device in devices]
    started = time.perf_counter()
    for publisher, chunk in zip(publishers, chunks, strict=True):
        assert publisher.stdin is not None
        publisher.stdin.write(chunk)
        publisher.stdin.flush()
    stored, last_change = base, time.perf_counter()
    while stored - base < expected and time.perf_counter() - last_change < 20:
        await asyncio.sleep(0.05)
        now = await _stored(conn)
        if now != stored:
            stored, last_change = now, time.perf_counter()
    for publisher in publishers:
        assert publisher.stdin is not None
        publisher.stdin.close()
    for publisher in publishers:
        publisher.wait(timeout=120)
    done, elapsed = stored - base, last_change - started
    return (
        f"fleet, original format: {expected:,} readings in batches of {BATCH} (QoS 1) from "
        f"{len(devices)} devices as fast as they go: {done:,} stored in {elapsed:.1f} s = "
        f"{done / elapsed:,.0f} readings/s; lost {expected - done:,}"
    )


async def _ready(http: httpx.AsyncClient) -> None:
    for _ in range(300):
        try:
            if (await http.get("/health/ready")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("the instance did not become ready")


async def run_fleet(pg_url: str, nats_url: str) -> None:
    """Registrations per second, then original-format ingest (see the module's docstring)."""
    from litestar import Litestar, get

    from services.licensing.keys import load_keyring

    keyring = load_keyring(Path(license_keys_dir()))

    @get("/.well-known/jwks.json")
    async def jwks() -> dict[str, Any]:
        return keyring.jwks()

    with tempfile.TemporaryDirectory(prefix="iotistic-bench-fleet-") as folder:
        tmp = Path(folder)
        customer_id = str(uuid.uuid4())
        broker = EmbeddedMosquitto(tmp / "mosquitto")
        broker.start()
        database_url = await create_database(pg_url)
        port = free_port()
        async with serving(Litestar([jwks])) as control:
            env = {
                "PATH": os.environ.get("PATH", ""),
                **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}),
                "INSTANCE_CUSTOMER_ID": customer_id,
                "DATABASE_URL": database_url,
                "LICENSE_FILE": _write(tmp / "license.jwt", _license(customer_id)),
                "LICENSE_JWKS_URL": f"{control.base_url}/.well-known/jwks.json",
                "HTTP_PORT": str(port),
                "MQTT_HOST": broker.host,
                "MQTT_PORT": str(broker.port),
                "MQTT_USERNAME": "bench-instance",
                "MQTT_PASSWORD": secrets.token_urlsafe(24),
                "MQTT_ADMIN_USERNAME": broker.admin_username,
                "MQTT_ADMIN_PASSWORD": broker.admin_password,
                "LOG_LEVEL": "WARNING",
            }
            server = subprocess.Popen(
                [str(Path(sys.executable).parent / "iotistic"), "run", "--target", "instance"],
                env=env,
            )
            try:
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}", timeout=60
                ) as http:
                    await _ready(http)
                    rss_before = _rss_mib(server.pid)
                    conn = await asyncpg.connect(
                        database_url, server_settings={"search_path": "instance"}
                    )
                    try:
                        key = f"iotpk_{secrets.token_urlsafe(32)}"
                        await conn.execute(
                            "INSERT INTO provisioning_keys (key_id, name, key_hash, created_at) "
                            "VALUES ($1, 'bench', $2, now())",
                            secrets.token_hex(8),
                            hashlib.sha256(key.encode()).digest(),
                        )
                        registered, devices = await _registrations(http, key)
                        rss_after = _rss_mib(server.pid)
                        ingested = await _original_ingest(conn, broker, devices[:PUBLISHERS])
                        dead = await conn.fetchval("SELECT count(*) FROM dead_letters")
                    finally:
                        await conn.close()
            finally:
                server.terminate()
                server.wait(timeout=30)
                broker.stop()
    print(registered)
    print(
        f"fleet: instance resident memory {rss_before:.0f} MiB before the registrations, "
        f"{rss_after:.0f} MiB after"
    )
    print(ingested)
    print(f"fleet: dead letters {dead:,} (none expected)")
