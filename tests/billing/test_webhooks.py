"""The Stripe webhook gateway, with payloads signed exactly as Stripe signs them."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from contracts import StripeEventReceived, StripeFacts, decode_envelope, decode_event
from libs.config import ServiceSettings
from libs.db.postgres import create_pool
from libs.eventlog.store import EventStore
from libs.runtime.platform import Platform
from services.billing.app import BILLING
from services.billing.stripe_payloads import purge_payloads
from services.billing.webhooks import stripe_key
from services.targets import build_app
from stripe_signing import SECRET, sign
from support import eventually, serving


def checkout_completed(customer_id: str) -> bytes:
    """A checkout.session.completed event in the shape of Stripe's API (2024-06-20)."""
    event_id = f"evt_{uuid.uuid4().hex[:24]}"
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "api_version": "2024-06-20",
            "created": int(time.time()),
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": None, "idempotency_key": None},
            "type": "checkout.session.completed",
            "data": {
                "object": {
                    "id": f"cs_test_{uuid.uuid4().hex}",
                    "object": "checkout.session",
                    "mode": "subscription",
                    "status": "complete",
                    "payment_status": "paid",
                    "customer": "cus_Q1w2e3r4t5y6u7",
                    "subscription": "sub_1PabcdEFGhijKLmn",
                    "client_reference_id": customer_id,
                    "metadata": {"customer_id": customer_id, "plan": "professional"},
                    "amount_total": 9900,
                    "currency": "eur",
                }
            },
        }
    ).encode()


def unknown_event() -> bytes:
    return json.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex[:24]}",
            "object": "event",
            "api_version": "2024-06-20",
            "created": int(time.time()),
            "livemode": False,
            "type": "radar.early_fraud_warning.created",
            "data": {"object": {"id": "issfr_1", "object": "radar.early_fraud_warning"}},
        }
    ).encode()


@pytest.fixture(scope="module")
async def client(settings: ServiceSettings, store: EventStore) -> AsyncIterator[httpx.AsyncClient]:
    platform = Platform.from_settings(settings, [BILLING], stripe_webhook_secret=SECRET)
    async with serving(build_app(platform, "billing")) as http:
        await platform.wait_started()
        yield http


async def post(client: httpx.AsyncClient, payload: bytes, signature: str | None) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    return await client.post("/webhooks/stripe", content=payload, headers=headers)


async def stored(store: EventStore, stripe_event_id: str) -> list[StripeEventReceived]:
    subject = store.subject("StripeEventReceived", stripe_key(stripe_event_id))
    found = []
    async for message in store.read(event_types=["StripeEventReceived"]):
        if message.subject == subject:
            event = decode_event(decode_envelope(message.data))
            assert isinstance(event, StripeEventReceived)
            found.append(event)
    return found


def metric(text: str, outcome: str, event_type: str) -> float:
    for line in text.splitlines():
        if (
            line.startswith("iotistic_stripe_webhooks_total{")
            and f'outcome="{outcome}"' in line
            and f'type="{event_type}"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_signed_webhook_is_stored_once_however_often_stripe_sends_it(
    client, settings, store: EventStore
) -> None:
    payload = checkout_completed("cust-1")
    stripe_id = json.loads(payload)["id"]
    answers = [await post(client, payload, sign(payload)) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.json()["duplicate"] for a in answers] == [False, True, True]
    [event] = await stored(store, stripe_id)
    assert event.payload is None  # the body is billing's, kept apart; the log has its facts
    assert event.facts == StripeFacts(
        id=json.loads(payload)["data"]["object"]["id"],
        customer="cus_Q1w2e3r4t5y6u7",
        metadata_customer_id="cust-1",
        metadata_plan="professional",
        client_reference_id="cust-1",
        subscription="sub_1PabcdEFGhijKLmn",
        status="complete",
        currency="eur",
    )
    assert event.stripe_type == "checkout.session.completed"
    assert event.customer_id == "cust-1"
    assert await kept(settings, stripe_id) == [payload]  # exactly as Stripe sent it, once
    metrics = (await client.get("/metrics")).text
    assert metric(metrics, "received", "checkout.session.completed") == 1
    assert metric(metrics, "duplicate", "checkout.session.completed") == 2
    processed = await eventually(
        lambda: client.get("/metrics"),
        lambda r: metric(r.text, "processed", "checkout.session.completed") >= 1,
        what="the stored event processed by billing",
    )
    assert metric(processed.text, "processed", "checkout.session.completed") == 1


@pytest.mark.parametrize("case", ["forged", "other secret", "stale", "missing", "garbled"])
async def test_a_webhook_that_stripe_did_not_sign_gets_400_and_nothing_is_stored(
    client, store: EventStore, case: str
) -> None:
    payload = checkout_completed("cust-2")
    stripe_id = json.loads(payload)["id"]
    signature = {
        "forged": sign(payload).split(",v1=")[0] + ",v1=" + "0" * 64,
        "other secret": sign(payload, secret="whsec_not_ours_at_all"),
        "stale": sign(payload, at=int(time.time()) - 3600),
        "missing": None,
        "garbled": "this is no signature",
    }[case]
    before = await store.last_seq()
    response = await post(client, payload, signature)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
    assert "Traceback" not in response.text
    assert await store.last_seq() == before
    assert await stored(store, stripe_id) == []


async def test_a_malformed_body_gets_400(client, store: EventStore) -> None:
    before = await store.last_seq()
    for payload in (b"{not json", b'{"id": "evt_1"}', b"\xff\xfe"):
        response = await post(client, payload, sign(payload))
        assert response.status_code == 400, payload
    assert await store.last_seq() == before


async def test_an_unknown_event_type_is_acknowledged_and_recorded(client, store) -> None:
    payload = unknown_event()
    response = await post(client, payload, sign(payload))
    assert response.status_code == 200
    [event] = await stored(store, json.loads(payload)["id"])
    assert event.stripe_type == "radar.early_fraud_warning.created"
    assert event.customer_id is None
    assert event.facts is None  # billing reads nothing of an object of this type


async def test_without_a_webhook_secret_every_webhook_is_refused(
    client, settings, store: EventStore
) -> None:
    from prometheus_client import CollectorRegistry

    from services.billing.webhooks import WebhookMetrics, WebhookNotConfigured, receive_webhook

    payload = checkout_completed("cust-3")
    pool = await create_pool(settings.database_url, BILLING.schema)
    try:
        with pytest.raises(WebhookNotConfigured):
            await receive_webhook(
                store,
                pool,
                payload,
                sign(payload),
                secret=None,
                tolerance=300,
                metrics=WebhookMetrics(CollectorRegistry()),
            )
    finally:
        await pool.close()
    assert await stored(store, json.loads(payload)["id"]) == []
    assert await kept(settings, json.loads(payload)["id"]) == []


async def test_the_purge_deletes_the_bodies_past_their_retention_and_keeps_the_rest(
    client, settings
) -> None:
    pool = await create_pool(settings.database_url, BILLING.schema)
    try:
        async with pool.acquire() as conn:
            await conn.execute("DELETE FROM stripe_payloads")
            for stripe_id, days in [("evt_old", 31), ("evt_recent", 29)]:
                await conn.execute(
                    "INSERT INTO stripe_payloads (stripe_event_id, stripe_type, payload, "
                    "received_at) VALUES ($1, 'invoice.paid', $2, "
                    "now() - make_interval(days => $3))",
                    stripe_id,
                    b'{"id": "%s"}' % stripe_id.encode(),
                    days,
                )
        assert await purge_payloads(pool, 30) == 1
        assert await purge_payloads(pool, 30) == 0
        remaining = await pool.fetch("SELECT stripe_event_id FROM stripe_payloads")
        assert [r["stripe_event_id"] for r in remaining] == ["evt_recent"]
        assert await purge_payloads(pool, 28.5) == 1
    finally:
        await pool.close()


async def kept(settings: ServiceSettings, stripe_event_id: str) -> list[bytes]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch(
            "SELECT payload FROM billing.stripe_payloads WHERE stripe_event_id = $1",
            stripe_event_id,
        )
    finally:
        await conn.close()
    return [bytes(row["payload"]) for row in rows]
