"""One customer instance under load: MQTT ingest into Postgres, aggregate queries, idle memory.

``ingest``: an ``iotistic run --target instance`` process with an enterprise license, 100
devices, and two publisher processes sending QoS 1 readings as fast as the broker takes them;
the figure is readings stored per second from the first publish until every reading is in
Postgres, and whether any was lost. The instance's resident memory is read before the load.

``query``: 10 million readings (100 devices, 30 days) loaded with COPY, rolled up, then the
instance's own aggregate query for one device over 24 hours (5-minute buckets, raw readings)
and over 30 days (1-day buckets, from the rollups), 200 times each.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from libs.db import create_pool, load_migrations, migrate
from libs.embedded import free_port
from libs.mqtt_broker import EmbeddedMosquitto
from libs.mqtt_dynsec import Acl, DynSec
from services.instance.readings import COLUMNS, METRICS, aggregate
from tests.support import create_database, license_keys_dir, serving

DEVICES = 100
READINGS = 200_000
PUBLISHERS = 2


def _license(customer_id: str) -> str:
    from services.licensing.keys import LicenseSigner, load_keyring
    from services.licensing.reactors import signed_license

    now = datetime.now(UTC)
    return signed_license(
        LicenseSigner(load_keyring(Path(license_keys_dir()))),
        customer_id=customer_id,
        license_id=str(uuid.uuid4()),
        plan_name="enterprise",
        license_type="subscription",
        issued_at=now,
        expires_at=now + timedelta(days=30),
        grace_until=None,
        reason="bench",
    ).jwt


def _publisher(
    host: str, port: int, user: str, password: str, topics: list[str], count: int
) -> None:
    import json

    import paho.mqtt.client as mqtt

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{uuid.uuid4().hex[:8]}"
    )
    client.username_pw_set(user, password)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(5000)
    client.connect(host, port)
    client.loop_start()
    body = {
        "temperature": 21.5,
        "humidity": 40.0,
        "pressure": 1010.0,
        "gas_resistance": 1.2e5,
        "iaq": 50.0,
        "iaq_accuracy": 3,
    }
    infos = []
    for index in range(count):
        body["ts"] = int(time.time() * 1000)
        while True:
            info = client.publish(topics[index % len(topics)], json.dumps(body), qos=1)
            if info.rc != mqtt.MQTT_ERR_QUEUE_SIZE:
                break
            time.sleep(0.001)  # the client's queue is full: wait for acknowledgements
        infos.append(info)
    for info in infos:
        info.wait_for_publish()
    client.loop_stop()
    client.disconnect()


async def run_ingest(pg_url: str, nats_url: str) -> None:
    from litestar import Litestar, get

    from services.licensing.keys import load_keyring

    keyring = load_keyring(Path(license_keys_dir()))

    @get("/.well-known/jwks.json")
    async def jwks() -> dict[str, Any]:
        return keyring.jwks()

    with tempfile.TemporaryDirectory(prefix="iotistic-bench-ingest-") as folder:
        tmp = Path(folder)
        customer_id = str(uuid.uuid4())
        broker = EmbeddedMosquitto(tmp / "mosquitto")
        broker.start()
        database_url = await create_database(pg_url)
        license_file = _write(tmp / "license.jwt", _license(customer_id))
        port = free_port()
        async with serving(Litestar([jwks])) as control:
            env = {
                "PATH": os.environ.get("PATH", ""),
                "INSTANCE_CUSTOMER_ID": customer_id,
                "DATABASE_URL": database_url,
                "LICENSE_FILE": license_file,
                "LICENSE_JWKS_URL": f"{control.base_url}/.well-known/jwks.json",
                "HTTP_PORT": str(port),
                "MQTT_HOST": broker.host,
                "MQTT_PORT": str(broker.port),
                "MQTT_USERNAME": "bench-instance",
                "MQTT_PASSWORD": "bench-instance-password",
                "LOG_LEVEL": "WARNING",
            }
            async with DynSec(
                broker.host, broker.port, broker.admin_username, broker.admin_password
            ) as ds:
                root = f"{customer_id}/devices/#"
                await ds.ensure_role(
                    "bench",
                    [
                        Acl("subscribePattern", root),
                        Acl("publishClientReceive", root),
                        Acl("publishClientSend", root),
                    ],
                )
                await ds.ensure_client("bench-instance", "bench-instance-password", ["bench"])
                await ds.ensure_client("bench-publisher", "bench-publisher-password", ["bench"])
            server = subprocess.Popen(
                [str(Path(sys.executable).parent / "iotistic"), "run", "--target", "instance"],
                env=env,
            )
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                    for _ in range(300):
                        try:
                            if (await http.get("/health/ready")).status_code == 200:
                                break
                        except httpx.TransportError:
                            pass
                        await asyncio.sleep(0.1)
                await asyncio.sleep(2)
                rss = _rss_mib(server.pid)
                devices = [uuid.uuid4().hex[:16] for _ in range(DEVICES)]
                conn = await asyncpg.connect(
                    database_url, server_settings={"search_path": "instance"}
                )
                try:
                    await conn.executemany(
                        "INSERT INTO devices (device_id, name, mqtt_username, created_at) "
                        "VALUES ($1, $1, $1, now())",
                        [(d,) for d in devices],
                    )
                    await asyncio.sleep(1.5)  # the ingest's device cache
                    topics = [f"{customer_id}/devices/{d}/readings" for d in devices]
                    started = time.perf_counter()
                    workers = [
                        multiprocessing.Process(
                            target=_publisher,
                            args=(
                                broker.host,
                                broker.port,
                                "bench-publisher",
                                "bench-publisher-password",
                                topics[i::PUBLISHERS],
                                READINGS // PUBLISHERS,
                            ),
                        )
                        for i in range(PUBLISHERS)
                    ]
                    for worker in workers:
                        worker.start()
                    stored = 0
                    last_change, last = time.perf_counter(), -1
                    while stored < READINGS and time.perf_counter() - last_change < 20:
                        await asyncio.sleep(0.1)
                        stored = await conn.fetchval("SELECT count(*) FROM readings")
                        if stored != last:
                            last, last_change = stored, time.perf_counter()
                    elapsed = last_change - started
                    for worker in workers:
                        worker.join(timeout=60)
                    dead = await conn.fetchval("SELECT count(*) FROM dead_letters")
                finally:
                    await conn.close()
            finally:
                server.terminate()
                server.wait(timeout=30)
                broker.stop()
    print(f"instance: idle resident memory {rss:.0f} MiB")
    print(
        f"ingest: {READINGS:,} QoS 1 readings from {DEVICES} devices ({PUBLISHERS} publisher "
        f"processes): {stored:,} stored in {elapsed:.1f} s = {stored / elapsed:,.0f} readings/s; "
        f"lost {READINGS - stored - dead:,}, dead letters {dead:,}"
    )


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


QUERY_ROWS = 10_000_000


async def run_query(pg_url: str, nats_url: str) -> None:
    database_url = await create_database(pg_url)
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, "instance", load_migrations("services.instance.migrations", "service"))
    finally:
        await conn.close()
    pool = await create_pool(database_url, "instance", max_size=2)
    devices = [f"device-{i:03d}" for i in range(DEVICES)]
    end = datetime.now(UTC).replace(microsecond=0)
    start = end - timedelta(days=30)
    step = (end - start) / (QUERY_ROWS // DEVICES)
    loaded = time.perf_counter()
    async with pool.acquire() as conn:
        for day in range(31):
            d = (start + timedelta(days=day)).date()
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS readings_{d:%Y%m%d} PARTITION OF readings "
                f"FOR VALUES FROM ('{d}') TO ('{d + timedelta(days=1)}')"
            )
        per_device = QUERY_ROWS // DEVICES
        for device in devices:
            rows = [
                (
                    device,
                    start + step * i,
                    20.0 + (i % 100) / 10,
                    40.0,
                    1010.0,
                    1.2e5,
                    50.0,
                    3,
                    600.0,
                    0.8,
                )
                for i in range(per_device)
            ]
            await conn.copy_records_to_table("readings", records=rows, columns=COLUMNS)
    # Rollups as ingest would have made them, one metric at a time (no statement timeout).
    direct = await asyncpg.connect(database_url, server_settings={"search_path": "instance"})
    try:
        for metric in METRICS:
            await direct.execute(
                "INSERT INTO readings_hourly (device_id, hour, metric, n, total, low, high) "
                f"SELECT device_id, date_trunc('hour', ts), '{metric}', count({metric}), "
                f"sum({metric}), min({metric}), max({metric}) FROM readings "
                f"WHERE {metric} IS NOT NULL GROUP BY 1, 2"
            )
        await direct.execute("ANALYZE readings; ANALYZE readings_hourly")
    finally:
        await direct.close()
    load_seconds = time.perf_counter() - loaded
    results = {}
    async with pool.acquire() as conn:
        for label, since, bucket in (
            ("24-hour", timedelta(hours=24), "5m"),
            ("30-day", timedelta(days=30), "1d"),
        ):
            times = []
            for i in range(200):
                device = devices[i % DEVICES]
                t0 = time.perf_counter()
                await aggregate(
                    conn,
                    device,
                    end - since,
                    end,
                    bucket,
                    ["temperature", "humidity", "pressure", "iaq"],
                )
                times.append((time.perf_counter() - t0) * 1000)
            quantiles = statistics.quantiles(times, n=100)
            results[label] = (quantiles[49], quantiles[98])
    await pool.close()
    print(
        f"query: {QUERY_ROWS:,} readings ({DEVICES} devices, 30 days) loaded and rolled up "
        f"in {load_seconds:.0f} s"
    )
    for label, (p50, p99) in results.items():
        print(
            f"query: {label} aggregate of 4 metrics for one device: p50 {p50:.1f} ms, "
            f"p99 {p99:.1f} ms"
        )
