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
import os
import random
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

from libs.db.postgres import create_pool, load_migrations, migrate
from libs.mqtt.dynsec import Acl, DynSec
from libs.servers.mosquitto import EmbeddedMosquitto
from libs.servers.ports import free_port
from services.instance import fleet
from services.instance.readings import COLUMNS, ROLLUP_SQL, aggregate
from tests.support import create_database, license_keys_dir, serving

DEVICES = 100
# The burst: this many readings sent as fast as the publishers go (within the broker's queue
# for one subscriber, 200,000, so the broker drops none).
BURST = 150_000
# The sustained load: readings a second offered by the devices together, for this long.
SUSTAINED_RATE = int(os.environ.get("BENCH_INGEST_RATE", "20000"))
SUSTAINED_SECONDS = 30


def _license(customer_id: str) -> str:
    from services.licensing.issuing import LicenseSigner, signed_license
    from services.licensing.keys import load_keyring

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


LINE = (
    b'{"ts":%d,"temperature":%.1f,"humidity":40.0,"pressure":1010.0,'
    b'"gas_resistance":120000.0,"iaq":50.0,"iaq_accuracy":3}\n'
)


def _device_lines(count: int, first_ms: int) -> bytes:
    """``count`` readings, one JSON document a line, 1 ms apart from ``first_ms``."""
    return b"".join(LINE % (first_ms + index, 20.0 + (index % 50) / 10) for index in range(count))


def _publishers(
    host: str, port: int, user: str, password: str, topics: list[str], tag: str
) -> list[subprocess.Popen[bytes]]:
    """One ``mosquitto_pub -l`` per device (its own connection, QoS 1, 100 in flight) sending
    each line written to its stdin: a C client, so the load costs the machine little beside
    the instance."""
    return [
        subprocess.Popen(
            [
                *("mosquitto_pub", "-h", host, "-p", str(port), "-u", user, "-P", password),
                *("-i", f"bench-{tag}-{index}", "-q", "1", "-M", "100", "-t", topic, "-l"),
            ],
            stdin=subprocess.PIPE,
        )
        for index, topic in enumerate(topics)
    ]


def _finish(publishers: list[subprocess.Popen[bytes]]) -> None:
    for publisher in publishers:
        assert publisher.stdin is not None
        publisher.stdin.close()
    for publisher in publishers:
        publisher.wait(timeout=120)


async def _stored(conn: asyncpg.Connection) -> int:
    """Readings stored so far (the day's usage row, cheaper than counting the table)."""
    return int(await conn.fetchval("SELECT coalesce(sum(stored_readings), 0) FROM usage_days"))


async def _burst(conn: asyncpg.Connection, publish: Any, topics: list[str]) -> str:
    """Every device's share of ``BURST`` written to its publisher at once."""
    base = await _stored(conn)
    start_ms = int(time.time() * 1000) - 600_000
    chunks = [_device_lines(BURST // len(topics), start_ms) for _ in topics]
    publishers = publish(topics, "burst")
    started = time.perf_counter()
    for publisher, chunk in zip(publishers, chunks, strict=True):
        assert publisher.stdin is not None
        publisher.stdin.write(chunk)
        publisher.stdin.flush()
    stored, last_change = base, time.perf_counter()
    while stored - base < BURST and time.perf_counter() - last_change < 20:
        await asyncio.sleep(0.05)
        now = await _stored(conn)
        if now != stored:
            stored, last_change = now, time.perf_counter()
    _finish(publishers)
    done = stored - base
    elapsed = last_change - started
    return (
        f"ingest, burst: {BURST:,} QoS 1 readings from {len(topics)} devices as fast as they "
        f"go: {done:,} stored in {elapsed:.1f} s = {done / elapsed:,.0f} readings/s; "
        f"lost {BURST - done:,}"
    )


async def _sustained(conn: asyncpg.Connection, publish: Any, topics: list[str]) -> str:
    """``SUSTAINED_RATE`` readings a second offered for ``SUSTAINED_SECONDS``, in 0.1 s ticks;
    how far storage falls behind what was offered, and whether all of it is stored."""
    base = await _stored(conn)
    per_tick = SUSTAINED_RATE // 10 // len(topics)
    ticks = SUSTAINED_SECONDS * 10
    publishers = publish(topics, "sustained")
    offered, worst_lag = 0, 0
    started = time.perf_counter()
    for tick in range(ticks):
        now_ms = int(time.time() * 1000)
        for publisher in publishers:
            assert publisher.stdin is not None
            publisher.stdin.write(_device_lines(per_tick, now_ms - per_tick))
            publisher.stdin.flush()
        offered += per_tick * len(topics)
        if tick % 5 == 4:
            worst_lag = max(worst_lag, offered - (await _stored(conn) - base))
        await asyncio.sleep(max(0.0, started + (tick + 1) / 10 - time.perf_counter()))
    offered_for = time.perf_counter() - started
    stored, last_change = await _stored(conn) - base, time.perf_counter()
    while stored < offered and time.perf_counter() - last_change < 20:
        await asyncio.sleep(0.05)
        now = await _stored(conn) - base
        if now != stored:
            stored, last_change = now, time.perf_counter()
    drained = last_change - started - offered_for
    _finish(publishers)
    return (
        f"ingest, sustained: {offered / offered_for:,.0f} readings/s offered by "
        f"{len(topics)} devices for {offered_for:.0f} s ({offered:,} readings): {stored:,} "
        f"stored, lost {offered - stored:,}; storage at most {worst_lag:,} readings "
        f"({worst_lag / SUSTAINED_RATE:.2f} s) behind, all in {max(drained, 0):.1f} s after "
        f"the last was sent"
    )


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
                # The checkout being measured, also from a clone run with this venv.
                **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}),
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
                        # The instance also subscribes to the fleet's tree (issue 17); the
                        # bench registers no fleet device, so nothing arrives there.
                        Acl("subscribePattern", fleet.SUBSCRIPTION),
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

                    def publish(topics: list[str], tag: str) -> list[subprocess.Popen[bytes]]:
                        return _publishers(
                            broker.host,
                            broker.port,
                            "bench-publisher",
                            "bench-publisher-password",
                            topics,
                            tag,
                        )

                    burst = await _burst(conn, publish, topics)
                    sustained = await _sustained(conn, publish, topics)
                    dead = await conn.fetchval("SELECT count(*) FROM dead_letters")
                finally:
                    await conn.close()
            finally:
                server.terminate()
                server.wait(timeout=30)
                broker.stop()
    print(f"instance: idle resident memory {rss:.0f} MiB")
    print(burst)
    print(sustained)
    print(f"ingest: dead letters {dead:,} (none expected)")


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


QUERY_ROWS = 10_000_000


async def loaded_instance_database(
    pg_url: str, readings: int = QUERY_ROWS
) -> tuple[str, list[str], datetime, float]:
    """A new instance database, migrated, with ``readings`` readings of DEVICES devices over
    30 days and their rollups: its URL, the devices, the last reading's time, and the seconds
    loading took."""
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
    step = (end - start) / (readings // DEVICES)
    loaded = time.perf_counter()
    async with pool.acquire() as conn:
        for day in range(31):
            d = (start + timedelta(days=day)).date()
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS readings_{d:%Y%m%d} PARTITION OF readings "
                f"FOR VALUES FROM ('{d}') TO ('{d + timedelta(days=1)}')"
            )
        per_device = readings // DEVICES
        rng = random.Random(14)
        for device in devices:
            # Values as a BME688 sends them (two decimals, drifting), so that sizes on disk
            # and in a compressed dump are those of real readings, not of constants.
            rows = [
                (
                    device,
                    start + step * i,
                    round(21.0 + rng.gauss(0, 2), 2),
                    round(45.0 + rng.gauss(0, 8), 2),
                    round(1013.0 + rng.gauss(0, 4), 2),
                    round(rng.uniform(5e4, 2e5), 2),
                    round(rng.uniform(0, 200), 2),
                    3,
                    round(rng.uniform(400, 1500), 2),
                    round(rng.uniform(0.3, 3), 2),
                )
                for i in range(per_device)
            ]
            await conn.copy_records_to_table("readings", records=rows, columns=COLUMNS)
    # Rollups as ingest makes them, over the whole table at once (no statement timeout).
    direct = await asyncpg.connect(database_url, server_settings={"search_path": "instance"})
    try:
        await direct.execute(ROLLUP_SQL.format(source="readings"))
        await direct.execute("ANALYZE readings; ANALYZE readings_hourly")
    finally:
        await direct.close()
    await pool.close()
    return database_url, devices, end, time.perf_counter() - loaded


async def run_query(pg_url: str, nats_url: str) -> None:
    database_url, devices, end, load_seconds = await loaded_instance_database(pg_url)
    pool = await create_pool(database_url, "instance", max_size=2)
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
