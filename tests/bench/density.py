"""How many idle customer instances this machine holds: ``just bench density --count N``.

Instances are started the way production starts them on one machine: the provisioner's local
backend ``deploy`` (a database and role of their own in the shared Postgres, a client on the
shared Mosquitto, a license file, an ``iotistic run --target instance`` process), a few at a
time as the provisioner's queue runs them (``queue_concurrency``), each until its
``/health/ready`` answers with its license. A stand-in for the control plane serves what an
instance asks of it while idle: the JWKS and the usage reports.

After they have settled (no request reaches them), the figures: resident memory (RSS) and
proportional set size (PSS: shared pages divided among the processes sharing them, so PSS
figures add up) per instance, Postgres connections per instance (``pg_stat_activity``), the
memory of Postgres and Mosquitto, and the machine's MemAvailable before and after. The
capacity estimate divides what was available before by each instance's PSS with its share of
Postgres's, and the connections Postgres allows by each instance's; the smaller wins. What
MemAvailable lost per instance is shown beside it (it includes the kernel's part, but anything
else running on the machine moves it). Idle CPU is measured too: on 2 cores it is as much a
limit as memory.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from litestar import Litestar, get, post

from libs.db.postgres import create_pool, migrate, service_migrations
from libs.servers.mosquitto import EmbeddedMosquitto
from services.provisioner.backends.base import InstanceSpec
from services.provisioner.backends.local.backend import LocalBackend
from services.provisioner.settings import ProvisionerSettings
from tests.support import create_database, license_keys_dir, serving

COUNT = 200
# Seconds the instances are left alone before they are measured: their start-up work is done,
# their first usage report sent, connections above the pool's floor closed (10 s unused).
SETTLE_SECONDS = 30.0
# Then the CPU time the idle instances (and Postgres) use is counted over this long.
CPU_WINDOW_SECONDS = 10.0
MIB = 1024 * 1024


@dataclass(frozen=True)
class Footprint:
    """One process tree's memory, in bytes."""

    rss: int
    pss: int
    uss: int


def footprint(processes: list[psutil.Process]) -> Footprint:
    """The summed memory of ``processes`` (those gone meanwhile count nothing)."""
    rss = pss = uss = 0
    for process in processes:
        try:
            info = process.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        rss, pss, uss = rss + info.rss, pss + info.pss, uss + info.uss
    return Footprint(rss, pss, uss)


def mem_available() -> int:
    """The kernel's estimate of memory available for new work, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def control_plane_stand_in(keyring: Any) -> Litestar:
    """What an idle instance asks of the control plane: the JWKS, and taking usage reports."""

    @get("/.well-known/jwks.json")
    async def jwks() -> dict[str, Any]:
        return dict(keyring.jwks())

    @post("/api/instances/{customer_id:str}/usage", status_code=204)
    async def usage(customer_id: str) -> None:
        return None

    return Litestar([jwks, usage])


def trial_licenses() -> Callable[[str], tuple[str, str]]:
    """Signs a customer's starter trial license with the test key: (JWT, license id)."""
    from services.licensing.issuing import LicenseSigner, signed_license
    from services.licensing.keys import load_keyring

    signer = LicenseSigner(load_keyring(Path(license_keys_dir())))

    def sign(customer_id: str) -> tuple[str, str]:
        now = datetime.now(UTC)
        issued = signed_license(
            signer,
            customer_id=customer_id,
            license_id=str(uuid.uuid4()),
            plan_name="starter",
            license_type="trial_signup",
            issued_at=now,
            expires_at=now + timedelta(days=14),
            grace_until=None,
            reason="bench",
        )
        return issued.jwt, issued.license_id

    return sign


async def run(
    pg_url: str,
    nats_url: str,
    *,
    count: int = COUNT,
    concurrency: int = 3,
    settle: float = SETTLE_SECONDS,
) -> None:
    """Start ``count`` instances ``concurrency`` at a time, let them settle, measure, stop."""
    from services.licensing.keys import load_keyring

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per readiness probe

    with tempfile.TemporaryDirectory(prefix="iotistic-bench-density-") as folder:
        tmp = Path(folder)
        broker = EmbeddedMosquitto(tmp / "mosquitto")
        broker.start()
        try:
            stand_in = control_plane_stand_in(load_keyring(Path(license_keys_dir())))
            async with serving(stand_in) as control:
                settings = ProvisionerSettings(
                    database_url=await create_database(pg_url),
                    local_admin_database_url=pg_url,
                    nats_url=nats_url,
                    provisioner_secret=uuid.uuid4().hex * 2,
                    usage_secret=uuid.uuid4().hex * 2,
                    login_relay_secret=uuid.uuid4().hex * 2,
                    control_plane_url=str(control.base_url).rstrip("/"),
                    license_jwks_url=f"{str(control.base_url).rstrip('/')}/.well-known/jwks.json",
                    local_instances_dir=str(tmp / "instances"),
                    local_ready_timeout_seconds=300,
                    mqtt_host=broker.host,
                    mqtt_port=broker.port,
                    mqtt_admin_username=broker.admin_username,
                    mqtt_admin_password=broker.admin_password,
                )
                await _measure(settings, pg_url, broker, count, concurrency, settle)
        finally:
            broker.stop()


async def _measure(
    settings: ProvisionerSettings,
    pg_url: str,
    broker: EmbeddedMosquitto,
    count: int,
    concurrency: int,
    settle: float,
) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        await migrate(conn, "provisioner", service_migrations("services.provisioner.migrations"))
    finally:
        await conn.close()
    pool = await create_pool(settings.database_url, "provisioner", max_size=concurrency + 1)
    backend = LocalBackend(settings, lambda: pool)
    available_before = mem_available()
    customers = [str(uuid.uuid4()) for _ in range(count)]
    durations: dict[str, float] = {}
    started = time.perf_counter()
    try:
        await _deploy_all(backend, settings, customers, concurrency, durations)
        all_ready = time.perf_counter() - started
        await asyncio.sleep(settle)
        pids = [await _pid(backend, c) for c in customers]
        postmaster = await _postmaster_pid(pg_url)
        cpu = await _idle_cpu([_tree(pid) for pid in pids], _tree(postmaster))
        instances = [footprint(_tree(pid)) for pid in pids]
        available_after = mem_available()
        connections, max_connections = await _connections(pg_url)
        postgres = footprint(_tree(postmaster))
        mosquitto = footprint(_tree(broker.pid)) if broker.pid else Footprint(0, 0, 0)
        # What the provisioner itself concludes, with its budgets, while they all run.
        capacity = await backend.capacity()
    finally:
        await backend.stop()
        await pool.close()
    last = customers[-1]
    _report(
        count=count,
        concurrency=concurrency,
        settle=settle,
        last_start=durations[last],
        all_ready=all_ready,
        instances=instances,
        connections=connections,
        max_connections=max_connections,
        cpu=cpu,
        postgres=postgres,
        mosquitto=mosquitto,
        available_before=available_before,
        available_after=available_after,
        control_plane=settings.local_control_plane_connections,
    )
    print(
        f"density: the provisioner's capacity with {count} running: {capacity.limit} "
        f"(limited by {capacity.limited_by}; bounds {capacity.bounds}; budgets "
        f"{settings.local_memory_per_instance_mib} MiB and "
        f"{settings.local_connections_per_instance} connections per instance, "
        f"{settings.local_control_plane_connections} connections kept for the control plane)"
    )


async def _deploy_all(
    backend: LocalBackend,
    settings: ProvisionerSettings,
    customers: list[str],
    concurrency: int,
    durations: dict[str, float],
) -> None:
    """Deploy every customer's instance, at most ``concurrency`` at once, in order."""
    slots = asyncio.Semaphore(concurrency)
    licenses = trial_licenses()

    async def nothing(percent: int, step: str) -> None:
        return None

    async def deploy(customer_id: str) -> None:
        jwt, license_id = licenses(customer_id)
        spec = InstanceSpec(
            customer_id=customer_id,
            plan="starter",
            license_jwt=jwt,
            license_id=license_id,
            jwks_url=settings.license_jwks_url,
        )
        async with slots:
            began = time.perf_counter()
            await backend.deploy(spec, nothing)
            durations[customer_id] = time.perf_counter() - began

    async with asyncio.TaskGroup() as group:
        for customer_id in customers:
            group.create_task(deploy(customer_id))
            # Started in order, so the last customer is the last one to get a slot.
            await asyncio.sleep(0)


async def _pid(backend: LocalBackend, customer_id: str) -> int:
    status = await backend.status(customer_id)
    pid = status.get("pid")
    if not isinstance(pid, int):
        raise RuntimeError(f"the instance of {customer_id} is not running: {status}")
    return pid


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


async def _idle_cpu(
    instances: list[list[psutil.Process]], postgres: list[psutil.Process]
) -> tuple[list[float], float]:
    """Share of one core each idle instance uses, and the cores Postgres uses meanwhile, over
    ``CPU_WINDOW_SECONDS``."""
    before = [_cpu_seconds(tree) for tree in instances]
    postgres_before = _cpu_seconds(postgres)
    began = time.perf_counter()
    await asyncio.sleep(CPU_WINDOW_SECONDS)
    elapsed = time.perf_counter() - began
    after = [_cpu_seconds(tree) for tree in instances]
    shares = [(b - a) / elapsed for a, b in zip(before, after, strict=True)]
    return shares, (_cpu_seconds(postgres) - postgres_before) / elapsed


def _tree(pid: int) -> list[psutil.Process]:
    process = psutil.Process(pid)
    return [process, *process.children(recursive=True)]


async def _connections(pg_url: str) -> tuple[list[int], int]:
    """Connections each instance role holds (roles holding none included), and the server's
    ``max_connections``."""
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch(
            "SELECT r.rolname, count(a.pid) AS held FROM pg_roles r "
            "LEFT JOIN pg_stat_activity a ON a.usename = r.rolname "
            "WHERE r.rolname ~ '^inst_[0-9a-f]{32}$' GROUP BY r.rolname"
        )
        limit = int(await conn.fetchval("SHOW max_connections"))
    finally:
        await conn.close()
    return [int(r["held"]) for r in rows], limit


async def _postmaster_pid(pg_url: str) -> int:
    """The Postgres server's main process (the parent of this connection's backend)."""
    conn = await asyncpg.connect(pg_url)
    try:
        backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
        return psutil.Process(backend).ppid()
    finally:
        await conn.close()


def _report(
    *,
    count: int,
    concurrency: int,
    settle: float,
    last_start: float,
    all_ready: float,
    instances: list[Footprint],
    connections: list[int],
    max_connections: int,
    cpu: tuple[list[float], float],
    postgres: Footprint,
    mosquitto: Footprint,
    available_before: int,
    available_after: int,
    control_plane: int,
) -> None:
    rss = [f.rss / MIB for f in instances]
    pss = [f.pss / MIB for f in instances]
    uss = [f.uss / MIB for f in instances]
    taken = (available_before - available_after) / count
    by_memory = int(available_before / taken) if taken > 0 else 0
    # The same from the processes' own figures: an instance's PSS and its share of Postgres.
    pss_each = (statistics.median(pss) * MIB + postgres.pss / count) / MIB
    by_pss = int(available_before / MIB / pss_each)
    # The control plane's own pools and the superuser's reserve keep some connections.
    per_instance = max(connections) if connections else 0
    by_connections = (max_connections - control_plane) // per_instance if per_instance else 0
    print(
        f"density: {count} instances started by the local backend, {concurrency} at a time: "
        f"the last took {last_start:.1f} s to start, all ready in {all_ready:.1f} s "
        f"({all_ready / count:.2f} s each)"
    )
    print(
        f"density: per idle instance after {settle:.0f} s: RSS median {statistics.median(rss):.1f}"
        f" MiB, max {max(rss):.1f} MiB; PSS median {statistics.median(pss):.1f} MiB, max "
        f"{max(pss):.1f} MiB; USS median {statistics.median(uss):.1f} MiB"
    )
    print(
        f"density: Postgres connections per instance: median "
        f"{statistics.median(connections):g}, max {per_instance} ({sum(connections)} in all, "
        f"max_connections {max_connections})"
    )
    shares, postgres_cores = cpu
    print(
        f"density: idle CPU over {CPU_WINDOW_SECONDS:.0f} s: "
        f"{100 * statistics.median(shares):.2f}% "
        f"of a core per instance (median), {sum(shares):.2f} cores for all {count}; Postgres "
        f"{postgres_cores:.2f} cores"
    )
    print(
        f"density: Postgres in all: RSS {postgres.rss / MIB:.0f} MiB, PSS "
        f"{postgres.pss / MIB:.0f} MiB ({postgres.pss / MIB / count:.1f} MiB PSS per instance); "
        f"Mosquitto RSS {mosquitto.rss / MIB:.1f} MiB"
    )
    print(
        f"density: MemAvailable {available_before / 2**30:.2f} GiB before, "
        f"{available_after / 2**30:.2f} GiB after: {taken / MIB:.1f} MiB taken per instance"
    )
    print(
        f"density: estimated capacity of this machine: {min(by_pss, by_connections)} idle "
        f"instances (memory: {by_pss} by PSS of {pss_each:.1f} MiB each with its Postgres "
        f"share, {by_memory if taken > 0 else 'n/a'} by MemAvailable taken, which anything else "
        f"running here moves; Postgres connections: {by_connections} at max_connections "
        f"{max_connections} less {control_plane} for the control plane)"
    )
