"""The provisioner as separate processes (`iotistic run --target provisioner`), as it runs in
production: killed with -9 in the middle of a job, restarted, and two of them sharing the
queue's concurrency limit. Real Postgres, NATS, Mosquitto and instance processes; licensing
serves the JWKS the instances verify their licenses with.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from contracts import decode_envelope
from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.runtime.platform import Platform
from libs.servers.mosquitto import EmbeddedMosquitto
from libs.servers.ports import free_port
from services.licensing.app import LICENSING
from services.provisioner.backends.local.processes import instances_running
from services.targets import build_app
from support import eventually, license_keys_dir, serving, signed_license_issued

pytestmark = pytest.mark.slow

IOTISTIC = str(Path(sys.executable).parent / "iotistic")
WRAPPER = """#!/bin/sh
# Test wrapper around the instance command: starts slowly while {dir}/<customer>.slow says so.
f="{dir}/$INSTANCE_CUSTOMER_ID.slow"
if [ -f "$f" ]; then sleep "$(cat "$f")"; fi
exec "$@"
"""


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("control")
    script = folder / "instance.sh"
    script.write_text(WRAPPER.format(dir=folder))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return folder


@pytest.fixture(scope="module")
async def jwks_url(settings: ServiceSettings, store: EventStore) -> AsyncIterator[str]:
    platform = Platform.from_settings(settings, [LICENSING], license_keys_dir=license_keys_dir())
    async with serving(build_app(platform, "licensing")) as http:
        yield f"{http.base_url}/.well-known/jwks.json"


@pytest.fixture(scope="module")
def environment(
    settings: ServiceSettings, broker: EmbeddedMosquitto, control: Path, jwks_url: str
) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "NATS_URL": settings.nats_url,
        "NATS_CREDENTIALS_DIR": settings.nats_credentials_dir or "",
        "EVENTS_STREAM": settings.events_stream,
        "EVENTS_SUBJECT_PREFIX": settings.events_subject_prefix,
        "ADMIN_TOKEN": settings.admin_token or "",
        "SESSION_SECRET": settings.session_secret or "",
        "DATA_KEYS_MASTER_KEY": settings.data_keys_master_key or "",
        "PROVISIONER_SECRET": "s" * 40,
        "LICENSE_JWKS_URL": jwks_url,
        "LOCAL_INSTANCES_DIR": str(control / "instances"),
        "LOCAL_INSTANCE_COMMAND": f"{control / 'instance.sh'} {IOTISTIC} run --target instance",
        "QUEUE_LEASE_SECONDS": "2",
        "QUEUE_RETRY_DELAY": "200",
        "PROJECTION_ACK_WAIT_SECONDS": "5",
        "MQTT_HOST": broker.host,
        "MQTT_PORT": str(broker.port),
        "MQTT_ADMIN_USERNAME": broker.admin_username,
        "MQTT_ADMIN_PASSWORD": broker.admin_password,
        "HTTP_HOST": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
    }


class Provisioner:
    """One `iotistic run --target provisioner` process."""

    def __init__(self, env: dict[str, str], **extra: str) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [IOTISTIC, "run", "--target", "provisioner", "--port", str(self.port)],
            env={**env, **extra},
        )

    async def ready(self) -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}") as client:

            async def status() -> int:
                try:
                    return (await client.get("/health/ready", timeout=2)).status_code
                except httpx.TransportError:
                    return 0

            await eventually(status, lambda s: s == 200, timeout=60, what="provisioner ready")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            assert self.process.wait(timeout=60) == 0


async def job_of(settings: ServiceSettings, customer_id: str) -> Any:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return await conn.fetchrow(
            "SELECT * FROM provisioner.queue_jobs WHERE customer_id = $1 "
            "ORDER BY created_at DESC LIMIT 1",
            customer_id,
        )
    finally:
        await conn.close()


async def instance_url(settings: ServiceSettings, customer_id: str) -> str:
    conn = await asyncpg.connect(settings.database_url)
    try:
        port = await conn.fetchval(
            "SELECT port FROM provisioner.local_instances WHERE customer_id = $1", customer_id
        )
    finally:
        await conn.close()
    return f"http://127.0.0.1:{port}"


async def answers(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            return (await client.get(f"{url}/health/ready")).status_code == 200
    except httpx.TransportError:
        return False


async def events_of(store: EventStore, event_type: str, job_id: str) -> list[dict[str, Any]]:
    found = []
    async for message in store.read(event_types=[event_type]):
        body = json.loads(bytes(decode_envelope(message.data).data))
        if body["job_id"] == job_id:
            found.append(body)
    return found


async def test_a_job_survives_kill_9_of_its_provisioner_and_completes_once(
    settings, store, environment, control
) -> None:
    customer_id = str(uuid.uuid4())
    (control / f"{customer_id}.slow").write_text("4")
    first = Provisioner(environment)
    second = third = None
    try:
        await first.ready()
        await store.publish(signed_license_issued(customer_id), customer_id=customer_id)
        job = await eventually(
            lambda: job_of(settings, customer_id),
            lambda j: j is not None and j["state"] == "active" and j["step"] == "health",
            timeout=30,
            what="the job waiting for its instance",
        )
        first.kill()
        (control / f"{customer_id}.slow").write_text("0")

        second = Provisioner(environment)
        done = await eventually(
            lambda: job_of(settings, customer_id),
            lambda j: j["state"] == "completed",
            timeout=60,
            what="the job completed by the restarted provisioner",
        )
        assert done["job_id"] == job["job_id"]
        assert done["attempts"] == 2
        # The outbox reaches the log just after the queue's row says completed (milliseconds;
        # a provisioner busy at that moment, measuring its capacity say, widens the gap).
        await eventually(
            lambda: events_of(store, "DeploymentSucceeded", job["job_id"]),
            lambda found: len(found) > 0,
            what="the success on the log",
        )
        assert len(await events_of(store, "DeploymentSucceeded", job["job_id"])) == 1
        url = await instance_url(settings, customer_id)
        assert await answers(url)

        # A graceful restart stops the instance with the provisioner and starts it again.
        second.stop()
        assert not await answers(url)
        third = Provisioner(environment)
        await eventually(lambda: answers(url), bool, timeout=60, what="the instance back")
    finally:
        for process in (first, second, third):
            if process is not None and process.process.poll() is None:
                process.stop()


async def test_two_provisioners_share_the_concurrency_limit(
    settings, store, environment, control
) -> None:
    customers = [str(uuid.uuid4()) for _ in range(6)]
    for customer_id in customers:
        (control / f"{customer_id}.slow").write_text("1.5")
    processes = [Provisioner(environment, QUEUE_CONCURRENCY="2") for _ in range(2)]
    try:
        await asyncio.gather(*(p.ready() for p in processes))
        for customer_id in customers:
            await store.publish(signed_license_issued(customer_id), customer_id=customer_id)
        jobs = await eventually(
            lambda: asyncio.gather(*(job_of(settings, c) for c in customers)),
            lambda rows: all(r is not None and r["state"] == "completed" for r in rows),
            timeout=120,
            what="six jobs completed",
        )
    finally:
        for process in processes:
            process.stop()
    # A provisioner that stops stops its instances: none is left running.
    assert set(customers).isdisjoint(instances_running())
    spans = []
    for row in jobs:
        for attempt in json.loads(row["attempt_log"]):
            spans.append(
                (
                    datetime.fromisoformat(attempt["started_at"]),
                    datetime.fromisoformat(attempt["finished_at"]),
                    attempt["worker"],
                )
            )
    moments = sorted([(s, 1) for s, _, _ in spans] + [(e, -1) for _, e, _ in spans])
    running = most = 0
    for _, change in moments:
        running += change
        most = max(most, running)
    assert most == 2, spans
