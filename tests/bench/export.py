"""`./dev bench export`: the exit guarantee at size, on real instance processes.

Loads an instance database as the query benchmark does (10 million readings of 100 devices
over 30 days, with their rollups), starts an instance process on it and another on an empty
database (both on a Mosquitto of their own), then: exports everything from the first
(``GET /api/export``, streamed to a file) while sampling that process's resident memory, imports
the archive into the second (``POST /api/import``, streamed from the file) sampling the second's,
and exports the second again to check the round trip: the same row counts, and per device and
day the same readings CSV (the same sha256 once the renewed device ids are put back).

The control plane is a stand-in here (labelled): it serves the JWKS, vouches for one session
token per instance, and takes usage reports; the customer's events (which the real one serves)
are left out of these archives, as the manifest says.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
from litestar import Litestar, Request, get, post

from libs.db.postgres import load_migrations, migrate
from libs.servers.mosquitto import EmbeddedMosquitto
from libs.servers.ports import free_port
from tests.bench.instance import loaded_instance_database
from tests.support import create_database, license_keys_dir, serving

READINGS = 10_000_000
MIB = 2**20


def control_plane_stand_in(sessions: dict[str, str]) -> Litestar:
    """A stand-in of the control plane (not ours under test): the JWKS, the session tokens in
    ``sessions`` (token: customer id), usage reports taken and dropped."""
    from services.licensing.keys import load_keyring

    keyring = load_keyring(Path(license_keys_dir()))

    @get("/.well-known/jwks.json")
    async def jwks() -> dict[str, Any]:
        return dict(keyring.jwks())

    @get("/api/customers/me")
    async def me(request: Request[Any, Any, Any]) -> dict[str, Any]:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        return {"customer": {"customer_id": sessions.get(token, "nobody")}}

    @post("/api/instances/{customer_id:str}/usage", status_code=204)
    async def usage(customer_id: str) -> None:
        return None

    return Litestar([jwks, me, usage])


@contextlib.contextmanager
def instance_process(
    database_url: str, customer_id: str, control: str, broker: EmbeddedMosquitto, folder: Path
) -> Iterator[tuple[str, psutil.Process]]:
    """An instance process (``python -m services.instance``) on ``database_url``; its URL."""
    from services.licensing.issuing import LicenseSigner, signed_license
    from services.licensing.keys import load_keyring

    now = datetime.now(UTC)
    jwt = signed_license(
        LicenseSigner(load_keyring(Path(license_keys_dir()))),
        customer_id=customer_id,
        license_id=str(uuid.uuid4()),
        plan_name="enterprise",  # 500 devices, 5 years of retention: the bench's data fits
        license_type="subscription",
        issued_at=now,
        expires_at=now.replace(year=now.year + 1),
        grace_until=None,
        reason="bench",
    ).jwt
    port = free_port()
    env = {
        **os.environ,
        "INSTANCE_CUSTOMER_ID": customer_id,
        "DATABASE_URL": database_url,
        "LICENSE_JWT": jwt,
        "LICENSE_JWKS_URL": f"{control}/.well-known/jwks.json",
        "CONTROL_PLANE_URL": control,
        "MQTT_HOST": broker.host,
        "MQTT_PORT": str(broker.port),
        "MQTT_ADMIN_USERNAME": broker.admin_username,
        "MQTT_ADMIN_PASSWORD": broker.admin_password,
        "HTTP_PORT": str(port),
        "LOG_LEVEL": "WARNING",
    }
    with (folder / f"{customer_id}.log").open("wb") as log:
        process = psutil.Popen(
            [sys.executable, "-m", "services.instance"], env=env, stdout=log, stderr=log
        )
        try:
            yield f"http://127.0.0.1:{port}", process
        finally:
            process.terminate()
            process.wait(30)


async def _live(url: str) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/health/live")).status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the instance at {url} did not start")


class PeakRss:
    """The highest resident memory a process reached while sampled (every 50 ms)."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self.peak = 0
        self.start = process.memory_info().rss

    @contextlib.asynccontextmanager
    async def sampling(self) -> AsyncIterator[None]:
        async def sample() -> None:
            while True:
                self.peak = max(self.peak, self.process.memory_info().rss)
                await asyncio.sleep(0.05)

        task = asyncio.create_task(sample())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _export(url: str, token: str, path: Path) -> float:
    started = time.perf_counter()
    async with (
        httpx.AsyncClient(timeout=3600) as client,
        client.stream(
            "GET", f"{url}/api/export", headers={"Authorization": f"Bearer {token}"}
        ) as answer,
    ):
        if answer.status_code != 200:
            raise RuntimeError(f"export answered {answer.status_code}: {await answer.aread()!r}")
        with path.open("wb") as out:
            async for chunk in answer.aiter_bytes(1 << 20):
                out.write(chunk)
    return time.perf_counter() - started


async def _chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            yield chunk


async def _import(url: str, token: str, path: Path) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=3600) as client:
        answer = await client.post(
            f"{url}/api/import",
            content=_chunks(path),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/x-tar"},
        )
    if answer.status_code != 201:
        raise RuntimeError(f"import answered {answer.status_code}: {answer.text}")
    return time.perf_counter() - started, dict(answer.json())


def _manifest(path: Path) -> dict[str, Any]:
    with tarfile.open(path, mode="r:") as tar:
        member = tar.getmember("manifest.json")
        body = tar.extractfile(member)
        return dict(json.loads(body.read() if body else b""))


def round_trip_differences(first: Path, second: Path, renamed: dict[str, str]) -> list[str]:
    """What differs between the readings and rollups of two exports, the device ids of the
    first put to the ``renamed`` ones: the same rows, and the same sha256 per file."""
    before, after = _manifest(first), _manifest(second)
    place = {(f["kind"], f.get("device_id"), f.get("day")): f for f in after["files"]}
    differences = [
        f"{key}: {before['counts'].get(key)} then {after['counts'].get(key)}"
        for key in ("devices", "readings", "rollups", "alert_rules", "alert_history")
        if before["counts"].get(key) != after["counts"].get(key)
    ]
    with tarfile.open(first, mode="r:") as tar:
        for entry in before["files"]:
            if entry["kind"] not in {"readings-csv", "rollups-csv"}:
                continue
            new = renamed[entry["device_id"]]
            twin = place.get((entry["kind"], new, entry.get("day")))
            body = tar.extractfile(entry["name"])
            data = (body.read() if body else b"").replace(entry["device_id"].encode(), new.encode())
            if twin is None or twin["rows"] != entry["rows"]:
                differences.append(f"{entry['name']}: rows differ or missing")
            elif twin["sha256"] != hashlib.sha256(data).hexdigest():
                differences.append(f"{entry['name']}: sha256 differs")
    return differences


async def _empty_instance_database(pg_url: str) -> str:
    url = await create_database(pg_url)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, "instance", load_migrations("services.instance.migrations", "service"))
    finally:
        await conn.close()
    return url


async def run(pg_url: str, nats_url: str, readings: int = READINGS) -> None:
    source_url, devices, _, load_seconds = await loaded_instance_database(pg_url, readings)
    conn = await asyncpg.connect(source_url, server_settings={"search_path": "instance"})
    try:
        await conn.executemany(
            "INSERT INTO devices (device_id, name, mqtt_username, created_at) "
            "VALUES ($1, $1, 'dev-' || $1, now())",
            [(d,) for d in devices],
        )
        stored = await conn.fetchval("SELECT count(*) FROM readings")
    finally:
        await conn.close()
    target_url = await _empty_instance_database(pg_url)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    sessions = {"first-token": first, "second-token": second}
    with tempfile.TemporaryDirectory(prefix="iotistic-bench-export-") as tmp:
        folder = Path(tmp)
        broker = EmbeddedMosquitto(folder / "mosquitto")
        broker.start()
        try:
            async with serving(control_plane_stand_in(sessions)) as control:
                base = str(control.base_url).rstrip("/")
                with (
                    instance_process(source_url, first, base, broker, folder) as (a_url, a),
                    instance_process(target_url, second, base, broker, folder) as (b_url, b),
                ):
                    await asyncio.gather(_live(a_url), _live(b_url))
                    await _measure(folder, stored, load_seconds, (a_url, a), (b_url, b))
        finally:
            broker.stop()


async def _measure(
    folder: Path,
    stored: int,
    load_seconds: float,
    first: tuple[str, psutil.Process],
    second: tuple[str, psutil.Process],
) -> None:
    archive, again = folder / "first.tar", folder / "second.tar"
    exporting = PeakRss(first[1])
    async with exporting.sampling():
        export_seconds = await _export(first[0], "first-token", archive)
    importing = PeakRss(second[1])
    async with importing.sampling():
        import_seconds, answer = await _import(second[0], "second-token", archive)
    await _export(second[0], "second-token", again)
    differences = await asyncio.to_thread(
        round_trip_differences, archive, again, answer["device_ids"]
    )
    size = archive.stat().st_size
    print(
        f"export: {stored:,} readings of 100 devices over 30 days (loaded in {load_seconds:.0f} s)"
        f": archive {size / MIB:,.0f} MiB (CSV and Parquet per device and day) in "
        f"{export_seconds:.1f} s, {stored / export_seconds:,.0f} readings/s, "
        f"{size / MIB / export_seconds:.0f} MiB/s; instance RSS {exporting.start / MIB:.0f} MiB "
        f"before, peak {exporting.peak / MIB:.0f} MiB"
    )
    print(
        f"export: import into a new instance {import_seconds:.1f} s, "
        f"{stored / import_seconds:,.0f} readings/s; instance RSS {importing.start / MIB:.0f} MiB "
        f"before, peak {importing.peak / MIB:.0f} MiB"
    )
    verdict = "the same" if not differences else f"DIFFERENT: {differences[:5]}"
    print(
        f"export: round trip (export, import, export): counts and per-file sha256 {verdict} "
        f"({answer['counts']['readings']:,} readings restored)"
    )
