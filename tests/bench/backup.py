"""`just bench backup`: what a tenant's nightly backup costs, on real Postgres 18.

Loads an instance database as the query benchmark does (readings of 100 devices over 30 days,
with their rollups), then measures what the backup CronJob's script does to it: `pg_dump
--format=custom` (its time and size), `pg_restore --list` (the check before the rename), and a
restore into a new database. Prints the bytes a reading takes in the database and in the dump,
and the dump's share of the database: what STORAGE_BYTES_PER_READING and BACKUP_DUMP_RATIO
size tenants' volumes by.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path

import asyncpg

from libs.servers.postgres import postgres_bin_dir
from tests.bench.instance import loaded_instance_database
from tests.support import create_database

READINGS = 1_000_000


def _tool(name: str, *args: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(
        [str(Path(postgres_bin_dir()) / name), *args],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        timeout=3600,
    )
    return time.perf_counter() - started


async def run(pg_url: str, nats_url: str, readings: int = READINGS) -> None:
    database_url, devices, _, load_seconds = await loaded_instance_database(pg_url, readings)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("CHECKPOINT")
        database_bytes = await conn.fetchval("SELECT pg_database_size(current_database())")
        stored = await conn.fetchval("SELECT count(*) FROM instance.readings")
    finally:
        await conn.close()
    target_url = await create_database(pg_url)
    with tempfile.TemporaryDirectory(prefix="iotistic-bench-backup-") as folder:
        dump = Path(folder) / "bench.dump"
        dump_seconds = await asyncio.to_thread(
            _tool, "pg_dump", "--format=custom", f"--file={dump}", database_url, env={}
        )
        list_seconds = await asyncio.to_thread(_tool, "pg_restore", "--list", str(dump), env={})
        restore_seconds = await asyncio.to_thread(
            _tool,
            "pg_restore",
            "--no-owner",
            "--single-transaction",
            f"--dbname={target_url}",
            str(dump),
            env={},
        )
        dump_bytes = dump.stat().st_size
    print(
        f"backup: {stored:,} readings of {len(devices)} devices (30 days, with rollups), "
        f"loaded in {load_seconds:.0f} s: database {database_bytes / 2**20:.0f} MiB, "
        f"{database_bytes / stored:.0f} bytes a reading"
    )
    print(
        f"backup: pg_dump --format=custom {dump_seconds:.1f} s, {dump_bytes / 2**20:.0f} MiB "
        f"({dump_bytes / stored:.0f} bytes a reading, {dump_bytes / database_bytes:.2f} of the "
        f"database); pg_restore --list {list_seconds:.2f} s; restore into a new database "
        f"{restore_seconds:.1f} s"
    )
