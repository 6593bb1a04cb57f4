"""The local backend end to end: a signup becomes a running instance with its own database and
broker credentials; a new license reaches it; failing jobs back off and retry; a crashed
instance is restarted; a delete removes everything. Real Postgres, NATS, Mosquitto and
instance processes (`iotistic run --target instance`).

Instances are started through a small wrapper script that fails on purpose when the test
leaves a file naming the customer: a real process that really exits, so the retry path is the
one production takes.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt
import asyncpg
import httpx
import jwt
import pytest
from fleet_steps import register_fleet_device

from contracts import SubscriptionActivated, decode_envelope
from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.mqtt.dynsec import DynSec, owner_text
from libs.runtime.platform import Platform
from services.provisioner.backends.base import derive_password
from services.provisioner.backends.local.backend import instance_name
from services.targets import CONTROL_PLANE
from support import (
    assert_replays_clean,
    eventually,
    local_platform,
    signed_license_issued,
)

pytestmark = pytest.mark.slow

PASSWORD = "a long passphrase"
IOTISTIC = str(Path(sys.executable).parent / "iotistic")
WRAPPER = """#!/bin/sh
# Test wrapper around the instance command: fails while {dir}/<customer>.fail counts down.
f="{dir}/$INSTANCE_CUSTOMER_ID.fail"
if [ -f "$f" ]; then
  n=$(cat "$f")
  if [ "$n" -gt 0 ]; then echo $((n - 1)) > "$f"; echo "failing on purpose" >&2; exit 3; fi
fi
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
async def platform(
    settings: ServiceSettings, store: EventStore, broker: Any, control: Path, port: int
) -> Platform:
    return local_platform(
        settings,
        broker,
        port,
        control,
        local_instance_command=f"{control / 'instance.sh'} {IOTISTIC} run --target instance",
    )


async def sign_up(client: httpx.AsyncClient, email: str) -> tuple[str, dict[str, str]]:
    signed = await client.post(
        "/api/customers/signup",
        json={"email": email, "password": PASSWORD, "company_name": "Local Air"},
    )
    assert signed.status_code == 201, signed.text
    token = (
        await client.post("/api/customers/login", json={"email": email, "password": PASSWORD})
    ).json()["token"]
    return signed.json()["customer"]["customer_id"], {"Authorization": f"Bearer {token}"}


async def latest_job(client: httpx.AsyncClient, admin: dict[str, str], customer_id: str) -> Any:
    answer = await client.get(f"/api/queue/customer/{customer_id}/jobs", headers=admin)
    jobs = answer.json()["jobs"]
    return jobs[0] if jobs else None


async def finished_job(client, admin, customer_id: str, kind: str, timeout: float = 60) -> Any:
    return await eventually(
        lambda: latest_job(client, admin, customer_id),
        lambda j: j is not None and j["name"] == kind and j["state"] in ("completed", "failed"),
        timeout=timeout,
        what=f"{kind} finished",
    )


async def database_exists(settings: ServiceSettings, name: str) -> bool:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


async def test_signup_brings_up_an_instance_and_delete_removes_it(
    client, admin, platform, broker, settings
) -> None:
    customer_id, auth = await sign_up(client, "local@example.com")
    me = await eventually(
        lambda: client.get("/api/customers/me", headers=auth),
        lambda r: r.json()["deployment"]["status"] == "ready",
        timeout=60,
        what="the instance deployed",
    )
    deployment = me.json()["deployment"]
    url = deployment["instance_url"]
    license_id = jwt.decode(me.json()["license"]["jwt"], options={"verify_signature": False})[
        "licenseId"
    ]
    async with httpx.AsyncClient(base_url=url, timeout=5) as instance:
        assert (await instance.get("/health/ready")).status_code == 200
        held = (await instance.get("/api/license", headers=auth)).json()
    assert held["customer_id"] == customer_id
    assert held["status"] == "active"
    assert held["license_id"] == license_id
    job = await latest_job(client, admin, customer_id)
    assert (job["state"], job["attempts"], job["progress"]) == ("completed", 1, 100)

    name = instance_name(customer_id)
    assert await database_exists(settings, name)
    mqtt_password = derive_password(b"p" * 40, "mqtt", customer_id)
    client_id = f"instance-{derive_password(b'p' * 40, 'mqtt-client-id', customer_id)[:32]}"
    # The instance's broker client exists, with its password, bound to its own client id.
    async with DynSec(
        broker.host, broker.port, broker.admin_username, broker.admin_password
    ) as dynsec:
        assert (await dynsec.get_client(name) or {})["clientid"] == client_id
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(broker.host, broker.port, username=name, password=mqtt_password):
            pass

    # A device registers itself with a provisioning key: it gets a broker client of its own.
    async with httpx.AsyncClient(base_url=url, timeout=10, headers=auth) as instance:
        made = await instance.post("/api/provisioning-keys", json={"name": "fleet"})
        assert made.status_code == 201, made.text
    fleet_device = await register_fleet_device(url, made.json()["key"])
    async with DynSec(
        broker.host, broker.port, broker.admin_username, broker.admin_password
    ) as dynsec:
        assert await dynsec.get_client(fleet_device["mqtt"]["username"]) is not None

    status = await client.get(f"/api/customers/{customer_id}/deployment/status", headers=admin)
    assert status.status_code == 200
    assert status.json()["backend"]["release"] == "deployed"
    assert status.json()["instance"]["instance_url"] == url
    assert (await client.get(f"/api/customers/{customer_id}/deployment/status")).status_code == 401

    # With erasure asked (the local backend erases at once either way; kubernetes would
    # otherwise keep the data for its grace period): the job carries the wish.
    removal = await client.delete(
        f"/api/customers/{customer_id}/deployment", headers=admin, params={"erase": "true"}
    )
    assert removal.status_code == 202, removal.text
    assert removal.json()["data"]["erase"] is True
    done = await finished_job(client, admin, customer_id, "delete-customer-stack")
    assert done["state"] == "completed"
    with pytest.raises(httpx.TransportError):
        async with httpx.AsyncClient(timeout=2) as http:
            await http.get(f"{url}/health/live")
    assert not await database_exists(settings, name)
    async with DynSec(
        broker.host, broker.port, broker.admin_username, broker.admin_password
    ) as dynsec:
        assert await dynsec.get_client(name) is None
        # Nothing of the customer is left on the shared broker: its config publisher, and the
        # device that registered itself, whose uuid is free again for another account.
        assert await dynsec.get_client(f"{name}-config") is None
        assert await dynsec.get_client(fleet_device["mqtt"]["username"]) is None
        assert await dynsec.clients_named(owner_text(customer_id)) == []
    me = await eventually(
        lambda: client.get("/api/customers/me", headers=auth),
        lambda r: r.json()["deployment"]["status"] == "removed",
        what="the account shows the instance removed",
    )
    assert me.json()["deployment"]["instance_url"] is None


async def test_a_new_license_reaches_the_running_instance(client, admin, store) -> None:
    customer_id, auth = await sign_up(client, "upgrade-local@example.com")
    me = await eventually(
        lambda: client.get("/api/customers/me", headers=auth),
        lambda r: r.json()["deployment"]["status"] == "ready",
        timeout=60,
        what="the instance deployed",
    )
    url = me.json()["deployment"]["instance_url"]
    await store.publish(
        SubscriptionActivated(
            customer_id=customer_id,
            plan="professional",
            status="active",
            stripe_customer_id="cus_local",
            stripe_subscription_id="sub_local",
        ),
        customer_id=customer_id,
    )
    update = await finished_job(client, admin, customer_id, "update-customer-stack")
    assert update["state"] == "completed"
    async with httpx.AsyncClient(base_url=url, timeout=5) as instance:
        held = (await instance.get("/api/license", headers=auth)).json()
    assert held["plan"] == "professional"
    assert held["features"]["webhooks"] is True
    assert held["license_type"] == "subscription"


async def test_a_job_failing_twice_succeeds_on_its_third_attempt(
    client, admin, store, control
) -> None:
    customer_id = str(uuid.uuid4())
    (control / f"{customer_id}.fail").write_text("2")
    await store.publish(signed_license_issued(customer_id), customer_id=customer_id)
    job = await finished_job(client, admin, customer_id, "deploy-customer-stack")
    assert (job["state"], job["attempts"]) == ("completed", 3)
    log = job["attemptsLog"]
    assert [a["outcome"] for a in log] == ["failed", "failed", "completed"]
    assert "exited with code 3" in log[0]["error"]
    failed = []
    async for message in store.read(event_types=["DeploymentFailed"]):
        envelope = decode_envelope(message.data)
        if envelope.customer_id == customer_id:
            failed.append(envelope)
    assert len(failed) == 2
    # Backoff: 300 ms, then 600 ms, each from the failure to the next attempt's start.
    for index, delay in ((1, 0.3), (2, 0.6)):
        ended = datetime.fromisoformat(log[index - 1]["finished_at"])
        started = datetime.fromisoformat(log[index]["started_at"])
        assert (started - ended).total_seconds() >= delay


async def test_a_job_that_always_fails_ends_failed_and_retry_runs_it_again(
    client, admin, store, control
) -> None:
    customer_id = str(uuid.uuid4())
    fail = control / f"{customer_id}.fail"
    fail.write_text("99")
    await store.publish(signed_license_issued(customer_id), customer_id=customer_id)
    job = await finished_job(client, admin, customer_id, "deploy-customer-stack")
    assert (job["state"], job["attempts"]) == ("failed", 3)
    assert "exited with code 3" in job["failedReason"]
    fail.write_text("0")
    retried = await client.post(f"/api/queue/jobs/{job['id']}/retry", headers=admin)
    assert retried.status_code == 200, retried.text
    again = await eventually(
        lambda: client.get(f"/api/queue/jobs/{job['id']}", headers=admin),
        lambda r: r.json()["state"] == "completed",
        timeout=60,
        what="the retried job completed",
    )
    assert again.json()["attempts"] == 1
    assert (
        await client.post(f"/api/queue/jobs/{job['id']}/retry", headers=admin)
    ).status_code == 409
    assert (await client.post("/api/queue/jobs/nope/retry", headers=admin)).status_code == 404
    assert (await client.post(f"/api/queue/jobs/{job['id']}/retry")).status_code == 401


async def test_a_crashed_instance_is_restarted(client, admin, store) -> None:
    customer_id = str(uuid.uuid4())
    await store.publish(signed_license_issued(customer_id), customer_id=customer_id)
    await finished_job(client, admin, customer_id, "deploy-customer-stack")
    status = (
        await client.get(f"/api/customers/{customer_id}/deployment/status", headers=admin)
    ).json()
    pid = status["backend"]["pid"]
    os.kill(pid, signal.SIGKILL)
    again = await eventually(
        lambda: client.get(f"/api/customers/{customer_id}/deployment/status", headers=admin),
        lambda r: (
            r.json()["backend"]["pid"] not in (None, pid)
            and r.json()["backend"]["release"] == "deployed"
        ),
        timeout=30,
        what="the instance restarted",
    )
    assert again.json()["backend"]["restarts"] >= 1


async def test_queue_api_shapes_and_admin_credentials(client, admin, platform) -> None:
    stats = await client.get("/api/queue/stats", headers=admin)
    assert stats.status_code == 200
    assert set(stats.json()) == {"waiting", "active", "completed", "failed", "delayed", "total"}
    assert (await client.get("/api/queue/stats")).status_code == 401
    customer_id, auth = await sign_up(client, "own-jobs@example.com")
    own = await client.get(f"/api/queue/customer/{customer_id}/jobs", headers=auth)
    assert own.status_code == 200
    job = own.json()["jobs"][-1]
    assert set(job) >= {
        "id",
        "name",
        "state",
        "progress",
        "attempts",
        "maxAttempts",
        "timestamp",
        "processedOn",
        "finishedOn",
        "failedReason",
        "data",
    }
    assert job["id"].startswith(f"deploy-{customer_id}-")
    other, _ = await sign_up(client, "someone-else@example.com")
    assert (await client.get(f"/api/queue/customer/{other}/jobs", headers=auth)).status_code == 404
    missing = await client.post(f"/api/customers/{uuid.uuid4()}/deploy", headers=admin)
    assert missing.status_code == 404
    bad = await client.post("/api/queue/clean", json={"state": "active"}, headers=admin)
    assert bad.status_code == 400


async def test_the_admin_page_lists_jobs_and_its_buttons_work(
    client, admin, platform, store
) -> None:
    import base64
    import re

    assert (await client.get("/admin/queues")).status_code == 401
    challenge = (await client.get("/admin/queues")).headers["www-authenticate"]
    assert challenge.startswith("Basic")
    wrong = base64.b64encode(b"admin:wrong").decode()
    assert (
        await client.get("/admin/queues", headers={"Authorization": f"Basic {wrong}"})
    ).status_code == 401
    basic = {
        "Authorization": "Basic "
        + base64.b64encode(f"ops:{platform.settings.admin_token}".encode()).decode()
    }
    customer_id = str(uuid.uuid4())
    await store.publish(signed_license_issued(customer_id), customer_id=customer_id)
    job = await finished_job(client, admin, customer_id, "deploy-customer-stack")
    page = await client.get("/admin/queues?state=completed", headers=basic)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert job["id"] in page.text
    assert (await client.get("/admin/queues?state=bogus", headers=basic)).status_code == 400
    detail = await client.get(f"/admin/queues/jobs/{job['id']}", headers=basic)
    assert detail.status_code == 200
    assert "Attempts" in detail.text and "completed" in detail.text
    csrf = re.search(r"name='csrf' value='([0-9a-f]+)'", page.text).group(1)

    forged = await client.post(
        "/admin/queues/clean", data={"state": "completed", "csrf": "0" * 64}, headers=basic
    )
    assert forged.status_code == 403
    cleaned = await client.post(
        "/admin/queues/clean", data={"state": "completed", "csrf": csrf}, headers=basic
    )
    assert cleaned.status_code == 303
    assert (await client.get(f"/api/queue/jobs/{job['id']}", headers=admin)).status_code == 404


async def test_replay_verify_of_every_service_is_clean_after_the_flows(platform, store) -> None:
    await assert_replays_clean(platform.settings.database_url, store, list(CONTROL_PLANE.values()))
