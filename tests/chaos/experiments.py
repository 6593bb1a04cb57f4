"""The experiments: one fault each, injected while customers sign up, then the checks.

Each one builds its own ``Cluster`` and returns an ``Outcome``: its checks and its figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from tests.chaos.checks import Check, Convergence, converge, duplicate_checks, replay_checks
from tests.chaos.cluster import SERVICES, Cluster, ClusterError, probe_ready
from tests.chaos.load import Attempt, Fault, ReadinessWatch, sign_up, tally

SIGNUPS = 60
SHORT_SIGNUPS = 10
CONCURRENCY = 8
CONVERGE_TIMEOUT = 180.0
SHORT_CONVERGE_TIMEOUT = 90.0
READINGS = 3000
NATS_DISK_BYTES = 48 * 1024 * 1024


@dataclass
class Options:
    keep: bool = False
    short: bool = False

    @property
    def converge_timeout(self) -> float:
        return SHORT_CONVERGE_TIMEOUT if self.short else CONVERGE_TIMEOUT


@dataclass
class Outcome:
    """What an experiment found: its checks, its figures, or why it was skipped."""

    name: str
    checks: list[Check] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    skipped: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.skipped is None and all(c.ok for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


@contextlib.asynccontextmanager
async def cluster_for(options: Options, name: str, **kwargs: Any) -> AsyncIterator[Cluster]:
    """A started cluster in a fresh folder, always closed (and its folder removed)."""
    root = Path(tempfile.mkdtemp(prefix=f"iotistic-chaos-{name}-"))
    cluster = Cluster(root, keep=options.keep, **kwargs)
    try:
        await cluster.start()
        yield cluster
    finally:
        await asyncio.shield(cluster.close())
        if options.keep:
            print(f"   (kept {root})")


def watch_of(cluster: Cluster, extra: dict[str, str] | None = None) -> ReadinessWatch:
    return ReadinessWatch(lambda: {n: s.url for n, s in cluster.services.items()} | (extra or {}))


async def during_signups(
    cluster: Cluster, count: int, spacing: float, faults: Callable[[], Awaitable[None]]
) -> list[Attempt]:
    """Signups over the public API while ``faults`` runs; both must finish."""
    signups = asyncio.create_task(
        sign_up(cluster.public_url, count, concurrency=CONCURRENCY, spacing=spacing)
    )
    try:
        await faults()
        return await signups
    finally:
        signups.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await signups


async def conclude(
    outcome: Outcome,
    cluster: Cluster,
    watch: ReadinessWatch,
    attempts: list[Attempt],
    faults: list[Fault],
    options: Options,
    extra: dict[str, str] | None = None,
) -> Convergence:
    """The checks every experiment ends with, and its figures."""
    since = time.monotonic()
    accepted, probes = await signups_accepted_again(cluster, options.converge_timeout)
    attempts = [*attempts, *probes]
    outcome.checks.append(
        Check(
            "a new signup answered 201 after the fault",
            accepted is not None,
            f"{len(probes)} tried over {options.converge_timeout:.0f} s: {tally(probes)}",
        )
    )
    if accepted is not None:
        outcome.figures.append(f"new signups answered 201 again {accepted:.1f} s after the fault")
    conv = await converge(cluster, attempts, options.converge_timeout, extra, since)
    failed_on_log = sum(
        1 for a in attempts if a.status != "201" and a.email.lower() in conv.log.signed_up()
    )
    outcome.figures.append(
        f"signups {tally(attempts)}; {conv.customers} must converge "
        f"({failed_on_log} answered an error but are on the log)"
    )
    converged = conv.seconds is not None
    outcome.figures.append(
        f"converged {conv.seconds:.1f} s after the fault and the signups ended"
        if converged
        else f"NOT converged within {options.converge_timeout:.0f} s"
    )
    wrong = "; ".join(f"{who}: {', '.join(p)}" for who, p in list(conv.problems.items())[:8])
    if len(conv.problems) > 8:
        wrong += f"; and {len(conv.problems) - 8} more"
    outcome.checks.append(
        Check(
            "every acknowledged or logged signup complete (trial, license, deployment, "
            "instance ready, login)",
            not conv.problems,
            f"{len(conv.problems)} not: {wrong}" if conv.problems else "",
        )
    )
    outcome.checks.append(
        Check(
            "/health/ready 200 after convergence",
            not conv.not_ready,
            ", ".join(f"{n}: {s}" for n, s in conv.not_ready.items()),
        )
    )
    for fault in faults:
        seen = dict(watch.during(fault))
        outcome.checks.append(
            Check(
                f"/health/ready {'503 or down' if fault.down_counts else '503'} "
                f"during {fault.name}",
                watch.showed(fault),
                f"answers during the fault: {seen}",
            )
        )
        span = (fault.ended or time.monotonic()) - fault.started
        outcome.figures.append(f"{fault.name}: {span:.1f} s, readiness answered {seen}")
    if conv.log.error is None:
        outcome.checks += duplicate_checks(conv.log)
        outcome.figures.append(f"{len(conv.log.events)} events on the log")
    else:
        outcome.checks.append(Check("event log readable", False, conv.log.error))
    outcome.checks += await replay_checks(cluster)
    return conv


async def signups_accepted_again(
    cluster: Cluster, timeout: float
) -> tuple[float | None, list[Attempt]]:
    """Seconds until a fresh signup is answered 201 (one try every 3 s), and the tries: the
    platform recovered only if it takes new customers again."""
    started = time.monotonic()
    probes: list[Attempt] = []
    while time.monotonic() - started < timeout:
        probes += await sign_up(cluster.public_url, 1, tag=f"after{len(probes)}")
        if probes[-1].status == "201":
            return time.monotonic() - started, probes
        await asyncio.sleep(3.0)
    return None, probes


# --- 1. kill -9 of each service in separated mode ----------------------------------------------


async def kill_services(options: Options, services: tuple[str, ...] = SERVICES) -> Outcome:
    outcome = Outcome("services" if not options.short else "short-service-kill")
    count = SHORT_SIGNUPS if options.short else SIGNUPS
    spacing = 0.8 if options.short else 0.5
    every = (count * spacing) / (len(services) + 1)
    async with cluster_for(options, "services", separated=True) as cluster:
        watch = watch_of(cluster)
        faults: list[Fault] = []

        async def inject() -> None:
            began = time.monotonic()
            for index, name in enumerate(services):
                await asyncio.sleep(max(0.0, began + every * (index + 0.5) - time.monotonic()))
                fault = Fault(f"kill -9 {name}", (name,), down_counts=True)
                faults.append(fault)
                cluster.kill(name)
                await asyncio.sleep(2.0)  # the supervisor's restart delay
                cluster.spawn(cluster.services[name])
                back = await cluster.wait_ready(name)
                fault.end()
                outcome.figures.append(f"{name} restarted, ready {back:.1f} s after its start")

        async with watch.running():
            attempts = await during_signups(cluster, count, spacing, inject)
            await conclude(outcome, cluster, watch, attempts, faults, options)
    return outcome


# --- 2, 3. kill -9 of NATS, of Postgres --------------------------------------------------------


async def kill_server(options: Options, which: str) -> Outcome:
    outcome = Outcome(f"{which}-kill")
    async with cluster_for(options, outcome.name) as cluster:
        watch = watch_of(cluster)
        server = cluster.nats if which == "nats" else cluster.postgres
        assert server is not None
        fault = Fault(f"kill -9 {which}", ("all",))

        async def inject() -> None:
            await asyncio.sleep(4.0)
            fault.started = time.monotonic()
            await asyncio.to_thread(server.kill)
            await asyncio.sleep(3.0)
            await asyncio.to_thread(server.start)
            fault.end()

        async with watch.running():
            attempts = await during_signups(cluster, SIGNUPS, 0.5, inject)
            await conclude(outcome, cluster, watch, attempts, [fault], options)
    return outcome


# --- 4. SIGSTOP of NATS ------------------------------------------------------------------------


async def stop_nats(options: Options) -> Outcome:
    outcome = Outcome("short-nats-stop" if options.short else "nats-stop")
    seconds = 5.0 if options.short else 20.0
    count = SHORT_SIGNUPS if options.short else SIGNUPS
    spacing = 0.6 if options.short else 0.5
    async with cluster_for(options, "nats-stop") as cluster:
        watch = watch_of(cluster)
        fault = Fault(f"SIGSTOP nats {seconds:.0f} s", ("all",))

        async def inject() -> None:
            await asyncio.sleep(1.0 if options.short else 4.0)
            fault.started = time.monotonic()
            cluster.stop_nats()
            try:
                await asyncio.sleep(seconds)
            finally:
                cluster.continue_nats()
            fault.end()

        async with watch.running():
            attempts = await during_signups(cluster, count, spacing, inject)
            await conclude(outcome, cluster, watch, attempts, [fault], options)
    return outcome


# --- 5. an instance killed and its broker connection cut during readings -----------------------


async def instance_faults(options: Options) -> Outcome:
    outcome = Outcome("instance")
    async with cluster_for(options, "instance", relay_broker=True) as cluster:
        attempts = await sign_up(cluster.public_url, 1)
        first = await converge(cluster, attempts, options.converge_timeout)
        if first.seconds is None:
            raise ClusterError(f"the customer never got an instance: {first.problems}")
        customer_id = first.log.signed_up()[attempts[0].email][0]["customer_id"]
        async with httpx.AsyncClient(timeout=10) as client:
            device, instance_url = await register_device(cluster, client, attempts[0])
        watch = watch_of(cluster, {"instance": instance_url})
        killed = Fault("kill -9 instance", ("instance",), down_counts=True)
        cut = Fault("broker connection cut", ("instance",))
        relay = cluster.relay

        async def inject() -> None:
            await asyncio.sleep(3.0)
            killed.started = time.monotonic()
            before = cluster.instances()[customer_id]
            os.kill(before, signal.SIGKILL)
            async with httpx.AsyncClient() as client:
                while time.monotonic() - killed.started < 90:
                    again = cluster.instances().get(customer_id)
                    up = await probe_ready(client, instance_url)
                    if again not in (None, before) and up == "200":
                        break
                    await asyncio.sleep(0.1)
            killed.end()
            outcome.figures.append(f"instance back, ready in {killed.ended - killed.started:.1f} s")
            await asyncio.sleep(1.0)
            cut.started = time.monotonic()
            relay.go_down()  # type: ignore[union-attr]
            await asyncio.sleep(3.0)
            relay.come_back()  # type: ignore[union-attr]
            cut.end()

        async with watch.running():
            sent = await publish_during(cluster, device, inject)
            outcome.figures.append(f"{sent} QoS 1 readings published by mosquitto_pub")
            stored, distinct, waited = await readings_stored(cluster, customer_id)
            outcome.figures.append(
                f"readings stored {stored} rows, {distinct} distinct (after {waited:.1f} s)"
            )
            outcome.checks += [
                Check(f"all {READINGS} readings stored", distinct == READINGS, f"{distinct}"),
                Check("no duplicate readings", stored == distinct, f"{stored - distinct} extra"),
            ]
            extra = {"instance": instance_url}
            await conclude(outcome, cluster, watch, attempts, [killed, cut], options, extra)
    return outcome


async def register_device(
    cluster: Cluster, client: httpx.AsyncClient, attempt: Attempt
) -> tuple[dict[str, object], str]:
    login = await client.post(
        f"{cluster.public_url}/api/customers/login",
        json={"email": attempt.email, "password": attempt.password},
    )
    login.raise_for_status()
    auth = {"Authorization": f"Bearer {login.json()['token']}"}
    me = (await client.get(f"{cluster.public_url}/api/customers/me", headers=auth)).json()
    instance_url = me["deployment"]["instance_url"]
    made = await client.post(f"{instance_url}/api/devices", json={"name": "chaos"}, headers=auth)
    if made.status_code != 201:
        raise ClusterError(f"device registration: {made.status_code} {made.text}")
    return made.json()["mqtt"], instance_url


async def publish_during(
    cluster: Cluster, mqtt: dict[str, object], faults: Callable[[], Awaitable[None]]
) -> int:
    """``READINGS`` readings (distinct timestamps) at about 200/s through ``mosquitto_pub``,
    connected to the broker itself (the device is not the one cut off), while ``faults``."""
    topics = mqtt["topics"]
    assert isinstance(topics, dict)
    publisher = await asyncio.create_subprocess_exec(
        *("mosquitto_pub", "-h", cluster.mosquitto.host, "-p", str(cluster.mosquitto.port)),
        *("-u", str(mqtt["username"]), "-P", str(mqtt["password"])),
        *("-i", str(mqtt["client_id"]), "-q", "1", "-M", "100", "-t", topics["readings"], "-l"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    assert publisher.stdin is not None
    first_ms = int(time.time() * 1000) - 120_000
    injecting = asyncio.create_task(faults())
    sent = 0
    try:
        for tick in range(READINGS // 20):
            lines = b"".join(
                b'{"ts":%d,"temperature":21.5,"humidity":40.0,"pressure":1010.0,'
                b'"gas_resistance":120000.0,"iaq":50.0,"iaq_accuracy":3}\n' % (first_ms + i)
                for i in range(tick * 20, tick * 20 + 20)
            )
            publisher.stdin.write(lines)
            await publisher.stdin.drain()
            sent += 20
            await asyncio.sleep(0.1)
        await injecting
        publisher.stdin.close()
        await asyncio.wait_for(publisher.wait(), 60)
    finally:
        injecting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await injecting
        if publisher.returncode is None:
            publisher.kill()
            await publisher.wait()
    return sent


async def readings_stored(cluster: Cluster, customer_id: str) -> tuple[int, int, float]:
    """Rows and distinct (device, ts) in the instance's readings, once they stop changing
    (20 s without change) or all are in, within 120 s."""
    started = time.monotonic()
    conn = await asyncpg.connect(cluster.instance_database_url(customer_id), timeout=10)
    try:
        last: tuple[int, int] = (-1, -1)
        changed = time.monotonic()
        while True:
            row = await conn.fetchrow(
                "SELECT count(*) AS n, count(DISTINCT (device_id, ts)) AS d FROM instance.readings"
            )
            now = (int(row["n"]), int(row["d"]))
            if now != last:
                last, changed = now, time.monotonic()
            if now[1] >= READINGS and time.monotonic() - changed > 3:
                break
            if time.monotonic() - changed > 20 or time.monotonic() - started > 120:
                break
            await asyncio.sleep(0.5)
    finally:
        await conn.close()
    return last[0], last[1], time.monotonic() - started


# --- 6. a full NATS disk, then freed -----------------------------------------------------------


async def full_nats_disk(options: Options) -> Outcome:
    outcome = Outcome("nats-disk")
    try:
        async with cluster_for(options, "nats-disk", nats_disk_bytes=NATS_DISK_BYTES) as cluster:
            watch = watch_of(cluster)
            fault = Fault("NATS disk full", ("all",))
            filler = (cluster.mounted or cluster.root) / "filler"

            async def inject() -> None:
                fault.started = time.monotonic()
                size = await asyncio.to_thread(fill, filler)
                outcome.figures.append(f"disk filled with {size / 1048576:.1f} MiB more")
                try:
                    await asyncio.sleep(15.0)
                finally:
                    filler.unlink()
                fault.end()

            async with watch.running():
                attempts = await during_signups(cluster, SIGNUPS, 0.5, inject)
                await conclude(outcome, cluster, watch, attempts, [fault], options)
    except ClusterError as exc:
        if "small disk" not in str(exc):
            raise
        outcome.skipped = f"no small filesystem could be mounted for NATS: {exc}"
    return outcome


def fill(path: Path) -> int:
    """Write ``path`` until the filesystem has no byte left; returns its size. Unbuffered:
    a buffered file would fail again on close, flushing what the disk refused."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 1 << 12, 1):
            block = b"\0" * chunk
            while True:
                try:
                    written += os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


# --- the catalogue -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Experiment:
    name: str
    what: str
    run: Callable[[Options], Awaitable[Outcome]]
    short: bool = False


EXPERIMENTS = (
    Experiment(
        "services",
        "separated mode: kill -9 of signup, licensing, billing, provisioner in turn during "
        f"{SIGNUPS} signups, each restarted 2 s later",
        kill_services,
    ),
    Experiment(
        "nats-kill",
        f"kill -9 of NATS during {SIGNUPS} signups, restarted 3 s later (same port and data)",
        lambda o: kill_server(o, "nats"),
    ),
    Experiment(
        "postgres-kill",
        f"kill -9 of Postgres during {SIGNUPS} signups, restarted 3 s later",
        lambda o: kill_server(o, "postgres"),
    ),
    Experiment("nats-stop", f"SIGSTOP of NATS for 20 s during {SIGNUPS} signups", stop_nats),
    Experiment(
        "instance",
        f"kill -9 of an instance, then its broker connection cut 3 s, during {READINGS} "
        "QoS 1 readings",
        instance_faults,
    ),
    Experiment(
        "nats-disk",
        f"NATS's store on a {NATS_DISK_BYTES >> 20} MiB tmpfs, filled for 15 s during "
        f"{SIGNUPS} signups, then freed",
        full_nats_disk,
    ),
    Experiment(
        "short-nats-stop",
        f"SIGSTOP of NATS for 5 s during {SHORT_SIGNUPS} signups",
        stop_nats,
        short=True,
    ),
    Experiment(
        "short-service-kill",
        f"separated mode: kill -9 of signup during {SHORT_SIGNUPS} signups, restarted 2 s later",
        lambda o: kill_services(o, ("signup",)),
        short=True,
    ),
)
