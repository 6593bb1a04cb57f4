"""Stored Stripe events become billing's domain events, whatever order and however often."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from contracts import Envelope, decode_envelope
from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.projections.replay import replay_service
from libs.runtime.platform import Platform
from services.billing.app import BILLING
from services.billing.settings import BillingSettings
from services.billing.stripe_events import StripeTranslator
from services.billing.stripe_payloads import READ_TYPES
from services.billing.webhooks import stripe_key
from services.targets import build_app
from stripe_signing import SECRET, sign
from support import eventually, serving

PRICES = {"starter": "price_starter_m", "professional": "price_pro_m", "enterprise": "price_ent_m"}


@pytest.fixture(scope="module")
async def client(settings: ServiceSettings, store: EventStore) -> AsyncIterator[httpx.AsyncClient]:
    platform = Platform.from_settings(
        settings,
        [BILLING],
        stripe_webhook_secret=SECRET,
        stripe_price_starter=PRICES["starter"],
        stripe_price_professional=PRICES["professional"],
        stripe_price_enterprise=PRICES["enterprise"],
    )
    async with serving(build_app(platform, "billing")) as http:
        await platform.wait_started()
        yield http


def stripe_event(event_type: str, obj: dict[str, Any], created: int) -> bytes:
    return json.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex[:24]}",
            "object": "event",
            "api_version": "2024-06-20",
            "created": created,
            "livemode": False,
            "type": event_type,
            "data": {"object": obj},
        }
    ).encode()


def subscription(customer_id: str, sub_id: str, plan: str, status: str, period_end: int) -> dict:
    return {
        "id": sub_id,
        "object": "subscription",
        "customer": "cus_" + sub_id[4:],
        "status": status,
        "current_period_end": period_end,
        "items": {
            "object": "list",
            "data": [
                {
                    "id": "si_1",
                    "object": "subscription_item",
                    "price": {
                        "id": PRICES[plan],
                        "object": "price",
                        "recurring": {"interval": "month"},
                    },
                },
            ],
        },
        "metadata": {"customer_id": customer_id},
    }


async def domain_events(store: EventStore, customer_id: str) -> list[str]:
    found = []
    async for message in store.read(
        event_types=[
            "SubscriptionActivated",
            "SubscriptionChanged",
            "SubscriptionCanceled",
            "PaymentFailed",
        ]
    ):
        envelope = decode_envelope(message.data)
        if envelope.customer_id == customer_id:
            found.append(envelope.type)
    return found


async def subscription_row(settings: ServiceSettings, customer_id: str) -> Any:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return await conn.fetchrow(
            "SELECT plan, status FROM billing.subscriptions WHERE customer_id = $1", customer_id
        )
    finally:
        await conn.close()


async def send_all(client: httpx.AsyncClient, payloads: list[bytes]) -> None:
    for payload in payloads:
        response = await client.post(
            "/webhooks/stripe",
            content=payload,
            headers={"Stripe-Signature": sign(payload), "content-type": "application/json"},
        )
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_repeated_and_shuffled_webhooks_end_in_the_same_state(
    client, settings, store, seed: int
) -> None:
    customer_id, sub_id = str(uuid.uuid4()), f"sub_{uuid.uuid4().hex[:14]}"
    now = int(time.time())
    checkout = stripe_event(
        "checkout.session.completed",
        {
            "id": "cs_test_1",
            "object": "checkout.session",
            "mode": "subscription",
            "customer": "cus_" + sub_id[4:],
            "subscription": sub_id,
            "client_reference_id": customer_id,
            "metadata": {"customer_id": customer_id},
        },
        now,
    )
    created = stripe_event(
        "customer.subscription.created",
        subscription(customer_id, sub_id, "professional", "active", now + 30 * 86400),
        now + 1,
    )
    upgraded = stripe_event(
        "customer.subscription.updated",
        subscription(customer_id, sub_id, "enterprise", "active", now + 30 * 86400),
        now + 2,
    )
    deliveries = [checkout, created, upgraded] * 3
    random.Random(seed).shuffle(deliveries)
    await send_all(client, deliveries)

    row = await eventually(
        lambda: subscription_row(settings, customer_id),
        lambda r: r is not None and r["plan"] == "enterprise",
        what="the subscription on enterprise",
    )
    assert row["status"] == "active"
    events = await domain_events(store, customer_id)
    # Activated once; the upgrade is its own event only if it came after the creation.
    assert events.count("SubscriptionActivated") == 1
    assert events.count("SubscriptionChanged") <= 1
    assert len(events) <= 2


async def test_a_cancellation_is_never_undone_by_older_webhooks(client, settings, store) -> None:
    customer_id, sub_id = str(uuid.uuid4()), f"sub_{uuid.uuid4().hex[:14]}"
    now = int(time.time())
    created = stripe_event(
        "customer.subscription.created",
        subscription(customer_id, sub_id, "professional", "active", now + 86400),
        now,
    )
    deleted_obj = subscription(customer_id, sub_id, "professional", "canceled", now + 86400)
    deleted_obj["canceled_at"] = now + 5
    deleted = stripe_event("customer.subscription.deleted", deleted_obj, now + 5)
    stale_update = stripe_event(
        "customer.subscription.updated",
        subscription(customer_id, sub_id, "enterprise", "active", now + 86400),
        now + 3,
    )
    await send_all(client, [created, deleted, stale_update, created, deleted])
    row = await eventually(
        lambda: subscription_row(settings, customer_id),
        lambda r: r is not None and r["status"] == "canceled",
        what="the subscription canceled",
    )
    assert row["plan"] == "professional"
    assert await domain_events(store, customer_id) == [
        "SubscriptionActivated",
        "SubscriptionCanceled",
    ]


async def test_a_failed_payment_and_the_paid_invoice_after_it(client, settings, store) -> None:
    customer_id, sub_id = str(uuid.uuid4()), f"sub_{uuid.uuid4().hex[:14]}"
    now = int(time.time())
    created = stripe_event(
        "customer.subscription.created",
        subscription(customer_id, sub_id, "starter", "active", now + 86400),
        now,
    )
    invoice = {
        "id": "in_1",
        "object": "invoice",
        "subscription": sub_id,
        "amount_due": 2900,
        "currency": "eur",
        "attempt_count": 1,
        "next_payment_attempt": now + 3 * 86400,
    }
    failed = stripe_event("invoice.payment_failed", invoice, now + 1)
    paid = stripe_event("invoice.paid", {**invoice, "id": "in_1", "status": "paid"}, now + 2)
    await send_all(client, [created, failed, failed])
    await eventually(
        lambda: subscription_row(settings, customer_id),
        lambda r: r is not None and r["status"] == "past_due",
        what="past due",
    )
    await send_all(client, [paid])
    await eventually(
        lambda: subscription_row(settings, customer_id),
        lambda r: r["status"] == "active",
        what="active again",
    )
    assert await domain_events(store, customer_id) == [
        "SubscriptionActivated",
        "PaymentFailed",
        "SubscriptionChanged",
    ]


def version_1_event(payload: bytes, customer_id: str | None) -> Envelope:
    """A StripeEventReceived as the gateway before version 2 appended it: the body in full."""
    head = json.loads(payload)
    body = {
        "customer_id": customer_id,
        "stripe_event_id": head["id"],
        "stripe_type": head["type"],
        "stripe_created": datetime.fromtimestamp(head["created"], UTC).isoformat(),
        "livemode": False,
        "api_version": head["api_version"],
        "payload": payload.decode(),
    }
    return Envelope(
        event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"stripe:{head['id']}")),
        type="StripeEventReceived",
        version=1,
        occurred_at=datetime.now(UTC),
        customer_id=customer_id,
        correlation_id=str(uuid.uuid4()),
        data=msgspec.Raw(msgspec.json.encode(body)),
    )


async def test_version_1_events_with_the_whole_payload_still_drive_billing(
    client, settings, store
) -> None:
    customer_id, sub_id = str(uuid.uuid4()), f"sub_{uuid.uuid4().hex[:14]}"
    now = int(time.time())
    created = stripe_event(
        "customer.subscription.created",
        subscription(customer_id, sub_id, "professional", "active", now + 86400),
        now,
    )
    failed = stripe_event(
        "invoice.payment_failed",
        {"id": "in_v1", "subscription": sub_id, "amount_due": 4900, "currency": "eur"},
        now + 1,
    )
    for payload, customer in [(created, customer_id), (failed, None)]:
        key = stripe_key(json.loads(payload)["id"])
        await store.append(version_1_event(payload, customer), key=key)
    row = await eventually(
        lambda: subscription_row(settings, customer_id),
        lambda r: r is not None and r["status"] == "past_due",
        what="the subscription from version 1 events, past due",
    )
    assert row["plan"] == "professional"
    assert await domain_events(store, customer_id) == ["SubscriptionActivated", "PaymentFailed"]
    # A version 1 body that does not read as Stripe documents it is recorded, never parked.
    broken = stripe_event(
        "customer.subscription.updated",
        subscription(customer_id, sub_id, "enterprise", "active", 10**30),
        now + 2,
    )
    await store.append(
        version_1_event(broken, customer_id), key=stripe_key(json.loads(broken)["id"])
    )
    conn = await asyncpg.connect(settings.database_url)
    try:
        outcome = await eventually(
            lambda: conn.fetchval(
                "SELECT outcome FROM billing.stripe_events WHERE stripe_event_id = $1",
                json.loads(broken)["id"],
            ),
            what="the unreadable version 1 event recorded",
        )
    finally:
        await conn.close()
    assert outcome == "unreadable"
    assert (await subscription_row(settings, customer_id))["plan"] == "professional"


async def test_billing_replay_verifies_after_the_flows(client, settings, store) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        report = await replay_service(
            conn,
            store,
            schema="billing",
            migrations_package=BILLING.migrations_package,
            projections=BILLING.projections,
            verify=True,
        )
    finally:
        await conn.close()
    assert report.differences == 0
    assert report.events_applied > 0


def test_the_gateway_reads_the_facts_of_exactly_the_types_billing_acts_on() -> None:
    assert set(StripeTranslator(None, BillingSettings()).handlers()) == READ_TYPES
