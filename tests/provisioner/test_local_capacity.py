"""A platform at capacity, end to end with the local backend: real Postgres, NATS, Mosquitto and
instance processes, with ``MAX_INSTANCES=1``.

The second trial signs up as usual (201), is told its instance waits for capacity, and its
deployment waits in the queue (not failed, not retried) while the first instance runs and is
updated; once the first customer's instance is deleted the second one starts by itself. The
operator sees the capacity in ``/health/ready`` and ``/metrics`` all along.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from contracts import SubscriptionActivated, decode_envelope
from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.runtime.platform import Platform
from services.targets import CONTROL_PLANE
from support import assert_replays_clean, eventually, local_platform

pytestmark = pytest.mark.slow

PASSWORD = "a long passphrase"


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
        tmp_path_factory.mktemp("capacity"),
        max_instances=1,
        capacity_check_seconds=0.5,
    )


async def sign_up(client: httpx.AsyncClient, email: str) -> tuple[dict[str, Any], dict[str, str]]:
    signed = await client.post(
        "/api/customers/signup",
        json={"email": email, "password": PASSWORD, "company_name": "Full House"},
    )
    assert signed.status_code == 201, signed.text
    token = (
        await client.post("/api/customers/login", json={"email": email, "password": PASSWORD})
    ).json()["token"]
    return signed.json(), {"Authorization": f"Bearer {token}"}


async def account(client: httpx.AsyncClient, auth: dict[str, str]) -> dict[str, Any]:
    answer = await client.get("/api/customers/me", headers=auth)
    assert answer.status_code == 200, answer.text
    return answer.json()


async def jobs(client: httpx.AsyncClient, admin: dict[str, str], customer_id: str) -> Any:
    return (await client.get(f"/api/queue/customer/{customer_id}/jobs", headers=admin)).json()[
        "jobs"
    ]


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


async def events_about(store: EventStore, customer_id: str, event_type: str) -> list[Any]:
    found = []
    async for message in store.read(event_types=[event_type]):
        envelope = decode_envelope(message.data)
        if envelope.customer_id == customer_id:
            found.append(envelope)
    return found


async def test_a_trial_waits_for_capacity_and_starts_when_a_slot_frees(
    client: httpx.AsyncClient, admin: dict[str, str], store: EventStore, platform: Platform
) -> None:
    first, first_auth = await sign_up(client, "first@example.com")
    first_id = first["customer"]["customer_id"]
    await eventually(
        lambda: account(client, first_auth),
        lambda a: a["deployment"]["status"] == "ready",
        timeout=60,
        what="the first instance deployed",
    )

    # The platform is full: the provisioner says so, and signup has applied what it said.
    def full_and_known(r: httpx.Response) -> bool:
        body = r.json()
        services = body["services"]
        return (
            r.status_code == 200
            and services["provisioner"]["capacity"]["running"] == 1
            and services["signup"]["projections"]["platform_capacity"]["checkpoint"] > 0
            and services["signup"]["projections"]["platform_capacity"]["lag"] == 0
        )

    ready = await eventually(
        lambda: client.get("/health/ready"), full_and_known, what="the platform known full"
    )
    # Full is not unhealthy: ready (200) and the operator sees why nothing more starts.
    capacity = ready.json()["services"]["provisioner"]["capacity"]
    assert (capacity["running"], capacity["limit"], capacity["limited_by"], capacity["full"]) == (
        1,
        1,
        "setting",
        True,
    )
    assert capacity["bounds"]["connections"] > 1

    second, second_auth = await sign_up(client, "second@example.com")
    second_id = second["customer"]["customer_id"]
    assert second["deployment"]["status"] == "waiting_for_capacity"
    assert "as soon as a slot frees" in second["deployment"]["detail"]
    assert "room" in second["message"]
    waiting = await eventually(
        lambda: account(client, second_auth),
        lambda a: a["deployment"]["status"] == "waiting_for_capacity",
        what="the account shows the deployment waiting for capacity",
    )
    assert "slot frees" in waiting["deployment"]["detail"]
    job = (await jobs(client, admin, second_id))[0]
    assert (job["state"], job["attempts"], job["waitingFor"]) == ("waiting", 0, "capacity")
    metrics = await eventually(
        lambda: client.get("/metrics"),
        lambda r: "iotistic_deployments_waiting_for_capacity 1.0" in r.text,
        what="the metrics showing the waiting deployment",
    )
    assert metric(metrics.text, "iotistic_instances_running") == 1
    assert metric(metrics.text, "iotistic_instances_capacity") == 1

    # An update of the running instance is not held.
    await store.publish(
        SubscriptionActivated(
            customer_id=first_id,
            plan="professional",
            status="active",
            stripe_customer_id="cus_full",
            stripe_subscription_id="sub_full",
        ),
        customer_id=first_id,
    )
    update = await eventually(
        lambda: jobs(client, admin, first_id),
        lambda js: js[0]["name"] == "update-customer-stack" and js[0]["state"] == "completed",
        timeout=60,
        what="the first instance updated",
    )
    assert update[0]["attempts"] == 1
    job = (await jobs(client, admin, second_id))[0]
    assert (job["state"], job["attempts"]) == ("waiting", 0)

    # The first customer's instance goes: the second starts by itself.
    removal = await client.delete(f"/api/customers/{first_id}/deployment", headers=admin)
    assert removal.status_code == 202, removal.text
    started = await eventually(
        lambda: account(client, second_auth),
        lambda a: a["deployment"]["status"] == "ready",
        timeout=60,
        what="the waiting instance started",
    )
    assert started["deployment"]["detail"] is None
    job = (await jobs(client, admin, second_id))[0]
    assert (job["state"], job["attempts"], job["waitingFor"]) == ("completed", 1, None)
    # Waiting was never a failure, and it was recorded once.
    assert await events_about(store, second_id, "DeploymentFailed") == []
    assert len(await events_about(store, second_id, "DeploymentWaitingForCapacity")) == 1
    changes = [
        decode_envelope(m.data) async for m in store.read(event_types=["InstanceCapacityChanged"])
    ]
    # Recorded when the platform filled up (not before: room is what everyone assumes).
    assert changes and json.loads(bytes(changes[0].data))["full"] is True


async def test_replay_verify_is_clean_after_the_flow(platform: Platform, store: EventStore) -> None:
    await assert_replays_clean(platform.settings.database_url, store, list(CONTROL_PLANE.values()))
