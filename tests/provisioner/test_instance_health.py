"""The health watch with the local backend: a deployed instance that stops answering is shown
degraded, redeployed by the provisioner on its own when it stays so, and ready again; one that
recovers by itself before the bound is recorded recovered, with no redeploy. Real Postgres,
NATS, Mosquitto and instance processes; an instance is broken by stopping it (SIGSTOP), so it
still holds its port and accepts connections but answers nothing, as a hung process does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from contracts import SubscriptionActivated, decode_envelope, decode_event
from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.runtime.platform import Platform
from services.provisioner.app import backend_of, health_watch_of, settings_of, worker_of
from services.provisioner.deployments import deployment_state
from services.provisioner.health import HealthWatch
from services.provisioner.metrics import HealthMetrics
from services.targets import CONTROL_PLANE
from support import assert_replays_clean, eventually, local_platform

pytestmark = pytest.mark.slow

PASSWORD = "a long passphrase"
# Short timings: a check every half second, each waiting one second for an answer, and a
# redeploy once an instance has been degraded for eight.
CHECK_SECONDS = 0.5
REDEPLOY_SECONDS = 8.0


@pytest.fixture(scope="module")
async def platform(
    settings: ServiceSettings,
    store: EventStore,
    broker: Any,
    port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Platform:
    return local_platform(
        settings,
        broker,
        port,
        tmp_path_factory.mktemp("health"),
        instance_health_check_seconds=CHECK_SECONDS,
        instance_health_timeout_seconds=1.0,
        instance_unhealthy_redeploy_seconds=REDEPLOY_SECONDS,
        instance_redeploy_backoff_max_seconds=120.0,
    )


async def ready_customer(
    client: httpx.AsyncClient, email: str
) -> tuple[str, dict[str, str], dict[str, Any]]:
    """A customer signed up, whose account shows their instance ready: id, session, account."""
    signed = await client.post(
        "/api/customers/signup",
        json={"email": email, "password": PASSWORD, "company_name": "Hung Air"},
    )
    assert signed.status_code == 201, signed.text
    customer_id = signed.json()["customer"]["customer_id"]
    token = (
        await client.post("/api/customers/login", json={"email": email, "password": PASSWORD})
    ).json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    me = await eventually(
        lambda: client.get("/api/customers/me", headers=auth),
        lambda r: r.json()["deployment"]["status"] == "ready",
        timeout=90,
        what="the instance deployed",
    )
    return customer_id, auth, me.json()


async def deployment_status(
    client: httpx.AsyncClient, admin: dict[str, str], customer_id: str
) -> dict[str, Any]:
    answer = await client.get(f"/api/customers/{customer_id}/deployment/status", headers=admin)
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def events_of(store: EventStore, customer_id: str, *types: str) -> list[Any]:
    """The customer's events of ``types`` on the log, in order."""
    found = []
    async for message in store.read(event_types=list(types)):
        envelope = decode_envelope(message.data)
        if envelope.customer_id == customer_id:
            found.append(decode_event(envelope))
    return found


async def health_watch_redeploys(store: EventStore, customer_id: str) -> int:
    requested = await events_of(store, customer_id, "DeploymentRequested")
    return sum(1 for r in requested if r.requested_by == "health-watch")


def metric(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(f"{name} "))
    return float(line.split()[1])


async def account_statuses_until(
    client: httpx.AsyncClient, auth: dict[str, str], final: str, timeout: float
) -> list[str]:
    """The account's deployment statuses seen (each change once) until it shows ``final``."""
    seen: list[str] = []

    async def status() -> str:
        value: str = (await client.get("/api/customers/me", headers=auth)).json()["deployment"][
            "status"
        ]
        if not seen or seen[-1] != value:
            seen.append(value)
        return value

    await eventually(status, lambda s: s == final, timeout=timeout, what=f"the account {final}")
    return seen


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        return " Z " not in Path(f"/proc/{pid}/stat").read_text()
    return True


async def test_a_hung_instance_is_shown_degraded_then_redeployed_and_ready_again(
    client, admin, store, platform
) -> None:
    customer_id, auth, account = await ready_customer(client, "hung@example.com")
    url = account["deployment"]["instance_url"]
    before = await deployment_status(client, admin, customer_id)
    assert before["customer"]["deploymentStatus"] == "deployed"
    pid = before["backend"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        degraded = await eventually(
            lambda: client.get("/api/customers/me", headers=auth),
            lambda r: r.json()["deployment"]["status"] == "degraded",
            timeout=30,
            what="the account shows the instance degraded",
        )
        shown = degraded.json()["deployment"]
        assert shown["health_reason"].startswith("not answering")
        assert shown["degraded_since"] is not None
        status = await deployment_status(client, admin, customer_id)
        assert status["customer"]["deploymentStatus"] in ("degraded", "recovering")
        # Nobody acts: the provisioner redeploys it once it has been degraded for the bound.
        seen = await account_statuses_until(client, auth, "ready", timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert "recovering" in seen, seen
    assert seen[-1] == "ready"
    # A fresh process answers on the same address; the hung one is gone.
    async with httpx.AsyncClient(timeout=5) as http:
        assert (await http.get(f"{url}/health/ready")).status_code == 200
    after = await deployment_status(client, admin, customer_id)
    assert after["backend"]["pid"] not in (None, pid)
    assert not alive(pid)
    assert after["customer"]["deploymentStatus"] == "deployed"
    assert after["health"]["state"] == "healthy"
    assert after["latestJob"]["data"]["requested_by"] == "health-watch"
    # Recorded once each, whatever the passes and replicas: one episode, one redeploy.
    assert len(await events_of(store, customer_id, "InstanceDegraded")) == 1
    assert await events_of(store, customer_id, "InstanceRecovered") == []
    assert await health_watch_redeploys(store, customer_id) == 1
    metrics = await eventually(
        lambda: client.get("/metrics"),
        lambda r: metric(r.text, "instances_unhealthy") == 0,
        what="no instance counted unhealthy",
    )
    assert metric(metrics.text, "instance_health_redeploys_total") >= 1


async def test_an_instance_whose_port_another_program_took_moves_to_a_new_one(
    client, admin
) -> None:
    customer_id, auth, account = await ready_customer(client, "moved@example.com")
    old_url = account["deployment"]["instance_url"]
    old_port = int(old_url.rsplit(":", 1)[1])
    pid = (await deployment_status(client, admin, customer_id))["backend"]["pid"]
    # The instance dies and, before it is started again, another program listens on its port
    # (answering nothing): every restart fails to bind, as after a reboot where a port moved.
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        try:
            squatter.bind(("127.0.0.1", old_port))
            break
        except OSError:
            await asyncio.sleep(0.01)
    squatter.listen()
    try:
        await eventually(
            lambda: client.get("/api/customers/me", headers=auth),
            lambda r: r.json()["deployment"]["status"] == "degraded",
            timeout=60,
            what="the account shows the instance degraded",
        )
        await account_statuses_until(client, auth, "ready", timeout=120)
        me = (await client.get("/api/customers/me", headers=auth)).json()["deployment"]
        new_url = me["instance_url"]
        assert new_url != old_url
        async with httpx.AsyncClient(timeout=5) as http:
            assert (await http.get(f"{new_url}/health/ready")).status_code == 200
    finally:
        squatter.close()


async def test_an_instance_that_recovers_by_itself_is_recorded_recovered_without_a_redeploy(
    client, admin, store, platform
) -> None:
    customer_id, auth, _ = await ready_customer(client, "hiccup@example.com")
    pid = (await deployment_status(client, admin, customer_id))["backend"]["pid"]
    runtime = platform.runtime_of("provisioner")
    # Two more replicas' watches, racing the running one over the same instances.
    replicas = [
        HealthWatch(
            runtime.db,
            runtime.events,
            settings_of(runtime),
            backend_of(runtime),
            HealthMetrics(CollectorRegistry()),
            worker_of(runtime).backend_started,
            lambda: None,
        )
        for _ in range(2)
    ]
    os.kill(pid, signal.SIGSTOP)
    try:
        # A first failed check records nothing; the second, on every replica at once, does.
        for _ in range(2):
            await asyncio.gather(*(replica.check_once() for replica in replicas))
        await eventually(
            lambda: client.get("/api/customers/me", headers=auth),
            lambda r: r.json()["deployment"]["status"] == "degraded",
            timeout=REDEPLOY_SECONDS - 2,
            what="the account shows the instance degraded",
        )
        await asyncio.gather(*(replica.check_once() for replica in replicas))
    finally:
        os.kill(pid, signal.SIGCONT)
    await account_statuses_until(client, auth, "ready", timeout=30)
    status = await deployment_status(client, admin, customer_id)
    assert status["backend"]["pid"] == pid, "it recovered on its own: the same process"
    assert status["customer"]["deploymentStatus"] == "deployed"
    recovered = await events_of(store, customer_id, "InstanceRecovered")
    degraded = await events_of(store, customer_id, "InstanceDegraded")
    assert (len(degraded), len(recovered)) == (1, 1)
    assert await health_watch_redeploys(store, customer_id) == 0


async def test_a_new_license_for_a_hung_instance_replaces_it_at_once(client, admin, store) -> None:
    customer_id, auth, account = await ready_customer(client, "hung-upgrade@example.com")
    url = account["deployment"]["instance_url"]
    pid = (await deployment_status(client, admin, customer_id))["backend"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        await store.publish(
            SubscriptionActivated(
                customer_id=customer_id,
                plan="professional",
                status="active",
                stripe_customer_id="cus_hung",
                stripe_subscription_id="sub_hung",
            ),
            customer_id=customer_id,
        )

        async def update_job() -> Any:
            jobs = (
                await client.get(f"/api/queue/customer/{customer_id}/jobs", headers=admin)
            ).json()["jobs"]
            return next((j for j in jobs if j["name"] == "update-customer-stack"), None)

        job = await eventually(
            update_job,
            lambda j: j is not None and j["state"] in ("completed", "failed"),
            timeout=60,
            what="the update finished",
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    # Not waited on until it timed out: replaced by a fresh process with the new license.
    assert (job["state"], job["attempts"]) == ("completed", 1), job
    async with httpx.AsyncClient(base_url=url, timeout=5, headers=auth) as instance:
        assert (await instance.get("/api/license")).json()["plan"] == "professional"
    assert (await deployment_status(client, admin, customer_id))["backend"]["pid"] != pid


async def test_deployment_status_answers_in_the_original_shape(client, admin) -> None:
    customer_id, _, account = await ready_customer(client, "shape@example.com")
    status = await deployment_status(client, admin, customer_id)
    customer = status["customer"]
    assert customer["customerId"] == customer_id
    assert customer["deploymentStatus"] == "deployed"
    assert customer["instanceUrl"] == account["deployment"]["instance_url"]
    assert customer["deployedAt"] is not None
    release = status["release"]
    assert (release["name"], release["status"], release["version"]) == ("local", "deployed", 1)
    assert release["lastDeployed"] == customer["deployedAt"]
    components = {c["name"]: c for c in status["components"]}
    assert components["instance"] == {"name": "instance", "status": "ready", "ready": True}
    assert components["database"]["ready"] is True
    assert all(set(c) == {"name", "status", "ready"} for c in status["components"])
    # Today's fields stay.
    assert {"customer", "instance", "backend", "latestJob"} <= set(status)
    assert status["backend"]["release"] == "deployed"
    assert customer["customer_id"] == customer_id


def test_repeated_redeploys_wait_longer_each_time(platform) -> None:
    watch = health_watch_of(platform.runtime_of("provisioner"))
    waits = [watch.redeploy_wait(n).total_seconds() for n in range(6)]
    assert waits == [8.0, 16.0, 32.0, 64.0, 120.0, 120.0]


async def test_replay_of_every_service_is_clean_after_the_flows(platform, store) -> None:
    await assert_replays_clean(platform.settings.database_url, store, list(CONTROL_PLANE.values()))


def test_the_deployment_state_in_the_original_words() -> None:
    def job(state: str, kind: str = "deploy-customer-stack", by: str = "system") -> Any:
        return {"state": state, "kind": kind, "data": json.dumps({"requested_by": by})}

    running = {"state": "running"}
    cases = [
        (None, None, False, "pending"),
        (None, job("waiting"), False, "pending"),
        (None, job("active"), False, "deploying"),
        (None, job("failed"), False, "failed"),
        (running, job("completed"), False, "deployed"),
        (running, job("completed"), True, "degraded"),
        (running, job("waiting", by="health-watch"), True, "recovering"),
        (running, job("active", by="health-watch"), True, "recovering"),
        (running, job("delayed", "update-customer-stack"), False, "pending"),
        (running, job("active", "delete-customer-stack"), False, "removing"),
        ({"state": "removed"}, job("completed", "delete-customer-stack"), False, "removed"),
    ]
    for instance, latest, degraded, expected in cases:
        assert deployment_state(instance, latest, degraded) == expected, (instance, latest)
