"""Integrations as a customer uses them, everything real (control plane, the provisioner's
local backend, Postgres, NATS, Mosquitto, the instance process, a receiver over HTTP): the
license's webhooks feature, checked input answered with the field and the reason, a secret
shown once, readings published over MQTT arriving live, a backfill asked for, followed and
cancelled through the API, and another customer finding nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from integration_steps import receiving
from test_instance import (  # noqa: F401 - client is a fixture
    Customer,
    client,
    customer,
    device_client,
    reading,
    register,
)

from contracts import SubscriptionActivated
from support import eventually

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def olga(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "olga@example.com")
    yield found
    await found.api.aclose()


@pytest.fixture(scope="module")
async def piet(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "piet@example.com")
    yield found
    await found.api.aclose()


async def upgrade(c: Customer, store) -> None:
    await store.publish(
        SubscriptionActivated(
            customer_id=c.id,
            plan="professional",
            status="active",
            stripe_customer_id=f"cus_{c.id[:8]}",
            stripe_subscription_id=f"sub_{c.id[:8]}",
        ),
        customer_id=c.id,
    )
    await eventually(
        lambda: c.api.get("/api/license"),
        lambda r: r.json().get("plan") == "professional",
        timeout=60,
        what="the professional license on the instance",
    )


def fields(answer: httpx.Response) -> list[str]:
    return [f["field"] for f in answer.json()["error"]["fields"]]


async def test_integrations_are_checked_licensed_and_their_secret_shown_once(
    olga, piet, store
) -> None:
    body = {"name": "lake", "url": "http://127.0.0.1:9/hook", "kinds": ["readings"]}
    refused = await olga.api.post("/api/integrations", json=body)
    assert refused.status_code == 403, refused.text
    assert "webhooks" in refused.json()["error"]["message"]
    await upgrade(olga, store)
    for bad, field in (
        ({"url": body["url"], "kinds": ["readings"]}, "name"),
        ({**body, "name": "x" * 101}, "name"),
        ({**body, "kinds": []}, "kinds"),
        ({**body, "kinds": ["readings", "everything"]}, "kinds"),
        ({**body, "kinds": "readings"}, "kinds"),
        ({**body, "url": "ftp://example.com/"}, "url"),
        ({**body, "url": "http://10.1.2.3/hook"}, "url"),
        ({**body, "url": "https://[::1"}, "url"),
        ({**body, "url": "http://x/" + "a" * 3000}, "url"),
        ({**body, "colour": "red"}, "colour"),
        ([], "body"),
    ):
        answer = await olga.api.post("/api/integrations", json=bad)
        assert answer.status_code == 400, (bad, answer.text)
        assert field in fields(answer), answer.text
    made = await olga.api.post("/api/integrations", json=body)
    assert made.status_code == 201, made.text
    secret = made.json()["secret"]
    assert len(secret) > 30
    path = f"/api/integrations/{made.json()['integration_id']}"
    # A retry after a lost answer finds the first, not a second with another secret.
    again = await olga.api.post("/api/integrations", json=body)
    assert again.status_code == 409
    assert fields(again) == ["name"]
    listed = (await olga.api.get("/api/integrations")).json()["integrations"]
    assert [i["name"] for i in listed] == ["lake"]
    assert secret not in str(listed)
    assert secret not in (await olga.api.get(path)).text
    changed = await olga.api.put(path, json={"kinds": ["readings", "alert"]})
    assert changed.status_code == 200, changed.text
    assert changed.json()["kinds"] == ["readings", "alert"]
    assert "secret" not in changed.json()
    rotated = await olga.api.put(path, json={"rotate_secret": True})
    assert rotated.json()["secret"] not in (None, secret)
    moved = await olga.api.put(path, json={"url": "http://127.0.0.2:9/hook"})
    assert moved.json()["secret"] not in (None, secret, rotated.json()["secret"])
    assert fields(await olga.api.put(path, json={"kinds": ["nope"]})) == ["kinds"]
    assert fields(await olga.api.put(path, json={"rotate_secret": "yes"})) == ["rotate_secret"]
    # Another customer's session on this instance finds nothing.
    async with httpx.AsyncClient(base_url=str(olga.api.base_url), headers=piet.auth) as other:
        assert (await other.get(path)).status_code == 404
        assert (await other.get("/api/integrations")).status_code == 404
        assert (await other.put(path, json={"name": "mine"})).status_code == 404
        assert (await other.delete(path)).status_code == 404
        span = {"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z"}
        assert (await other.post(f"{path}/backfills", json=span)).status_code == 404
    assert (await olga.api.delete(path)).status_code == 204
    assert (await olga.api.get(path)).status_code == 404
    assert (await olga.api.delete(path)).status_code == 404
    assert (await olga.api.get("/api/integrations/nosuch")).status_code == 404
    assert (await olga.api.get("/api/integrations/" + "x" * 1000)).status_code == 404
    huge = await olga.api.post("/api/integrations", json={**body, "name": "x" * 5000})
    assert huge.status_code == 413


async def test_readings_published_arrive_live_and_a_backfill_is_followed_and_cancelled(
    olga, broker
) -> None:
    device = await register(olga, "cellar")
    async with receiving() as receiver:
        made = await olga.api.post(
            "/api/integrations",
            json={"name": "warehouse", "url": receiver.url, "kinds": ["readings"]},
        )
        assert made.status_code == 201, made.text
        receiver.secret = made.json()["secret"]
        path = f"/api/integrations/{made.json()['integration_id']}"
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
        async with device_client(broker, device) as mqtt:
            for i in range(5):
                ts = (start + timedelta(minutes=i)).isoformat()
                await mqtt.publish(
                    device["mqtt"]["topics"]["readings"], reading(ts=ts, iaq_accuracy=1), qos=1
                )
        live = await eventually(
            lambda: asyncio.sleep(0, receiver.readings()),
            lambda sent: len(set(sent)) >= 5,
            timeout=30,
            what="the published readings sent live",
        )
        for bad, field in (
            ({"to": start.isoformat()}, "from"),
            ({"from": start.isoformat(), "to": (start - timedelta(hours=1)).isoformat()}, "to"),
            ({"from": "2026-01-01T00:00:00", "to": start.isoformat()}, "from"),
            ({"from": "yesterday", "to": start.isoformat()}, "from"),
            ({"from": start.isoformat(), "to": start.isoformat(), "rate": 0}, "rate"),
            ({"from": start.isoformat(), "to": (start + timedelta(1)).isoformat(), "x": 1}, "x"),
        ):
            answer = await olga.api.post(f"{path}/backfills", json=bad)
            assert answer.status_code == 400, (bad, answer.text)
            assert field in fields(answer), answer.text
        span = {"from": start.isoformat(), "to": (start + timedelta(hours=1)).isoformat()}
        asked = await olga.api.post(f"{path}/backfills", json=span)
        assert asked.status_code == 201, asked.text
        done = await eventually(
            lambda: olga.api.get(f"{path}/backfills/{asked.json()['backfill_id']}"),
            lambda r: r.json()["state"] == "done",
            timeout=30,
            what="the backfill done",
        )
        # A slow one (1 reading a second) is cancelled part-way.
        slow = await olga.api.post(
            f"{path}/backfills",
            json={"from": (start - timedelta(days=1)).isoformat(), "to": span["to"], "rate": 1},
        )
        assert slow.status_code == 201, slow.text
        slow_path = f"{path}/backfills/{slow.json()['backfill_id']}"
        await eventually(
            lambda: olga.api.get(slow_path),
            lambda r: r.json()["done"] >= 1,
            timeout=30,
            what="the slow backfill under way",
        )
        cancelled = await olga.api.delete(slow_path)
        listed = (await olga.api.get(f"{path}/backfills")).json()["backfills"]
    assert receiver.bad_signatures == 0
    sent = {ts for device_id, ts in live if device_id == device["device_id"]}
    assert sent == {(start + timedelta(minutes=i)).isoformat() for i in range(5)}
    assert all(r["calibrating"] for p in receiver.posts for r in p["readings"])
    progress = done.json()
    assert (progress["done"], progress["total"]) == (5, 5)
    backfilled = receiver.readings(backfill=progress["backfill_id"])
    assert sorted(backfilled) == sorted((device["device_id"], ts) for ts in sent)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["done"] < 5
    assert [b["state"] for b in listed] == ["cancelled", "done"]
