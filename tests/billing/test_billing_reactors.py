"""Billing's reactor handlers, each called alone on a billing schema of its own (no consumer,
no log): what each puts in the outbox, and that a redelivery puts nothing more."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from contracts import (
    CustomerSignedUp,
    Event,
    StripeCustomerLinked,
    StripeEventReceived,
    StripeFacts,
    SubscriptionActivated,
    TrialStarted,
    decode_envelope,
    decode_event,
    new_envelope,
)
from libs.db.postgres import migrate, service_migrations
from libs.projections.apply import Recorded
from services.billing.reactors import (
    when_customer_signed_up_start_trial,
    when_stripe_customer_linked_remember_it,
    when_stripe_event_stored_apply_it,
)
from services.billing.settings import BillingSettings
from services.billing.webhooks import WebhookMetrics

SIGNED_UP_AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    await connection.execute("CREATE SCHEMA IF NOT EXISTS billing")
    await connection.execute("SET search_path TO billing, public")
    await migrate(connection, "billing", service_migrations("services.billing.migrations"))
    try:
        yield connection
    finally:
        await connection.close()


def recorded(event: Event, customer_id: str | None, seq: int = 1) -> Recorded[Event]:
    return Recorded(seq=seq, envelope=new_envelope(event, customer_id=customer_id), event=event)


async def outbox_of(conn: asyncpg.Connection, customer_id: str) -> list[Event]:
    rows = await conn.fetch(
        "SELECT envelope FROM outbox WHERE subject_key = $1 ORDER BY id", customer_id
    )
    return [decode_event(decode_envelope(r["envelope"])) for r in rows]


async def test_a_signup_starts_the_trial_it_names_once(conn: asyncpg.Connection) -> None:
    customer_id = str(uuid.uuid4())
    signed_up = recorded(
        CustomerSignedUp(
            customer_id=customer_id,
            email="trial@example.com",
            email_display="Trial@example.com",
            company_name="Trial Air",
            signed_up_at=SIGNED_UP_AT,
            trial_days=30,
        ),
        customer_id,
    )
    await when_customer_signed_up_start_trial(conn, signed_up)
    await when_customer_signed_up_start_trial(conn, signed_up)  # delivered again
    assert await outbox_of(conn, customer_id) == [
        TrialStarted(
            customer_id=customer_id,
            plan="starter",
            trial_started_at=SIGNED_UP_AT,
            trial_ends_at=SIGNED_UP_AT + timedelta(days=30),
            trial_days=30,
        )
    ]


async def test_a_stripe_subscription_is_activated_and_counted(conn: asyncpg.Connection) -> None:
    customer_id = str(uuid.uuid4())
    settings = BillingSettings(stripe_price_professional="price_pro")
    metrics = WebhookMetrics(CollectorRegistry())
    linked = StripeCustomerLinked(customer_id=customer_id, stripe_customer_id="cus_alone")
    await when_stripe_customer_linked_remember_it(conn, recorded(linked, customer_id))
    created = recorded(
        StripeEventReceived(
            stripe_event_id="evt_alone_1",
            stripe_type="customer.subscription.created",
            stripe_created=SIGNED_UP_AT,
            livemode=False,
            # No metadata: the customer is found through the link remembered above.
            facts=StripeFacts(
                id="sub_alone", customer="cus_alone", status="active", price="price_pro"
            ),
        ),
        None,
        seq=2,
    )
    await when_stripe_event_stored_apply_it(conn, created, settings=settings, metrics=metrics)
    await when_stripe_event_stored_apply_it(conn, created, settings=settings, metrics=metrics)
    assert await outbox_of(conn, customer_id) == [
        SubscriptionActivated(
            customer_id=customer_id,
            plan="professional",
            status="active",
            stripe_customer_id="cus_alone",
            stripe_subscription_id="sub_alone",
            stripe_event_id="evt_alone_1",
        )
    ]
    processed = metrics.webhooks.labels("processed", "customer.subscription.created")
    assert processed._value.get() == 2
