"""Invoices and usage in the account view: billing records each invoice state once, signup
projects it, and a customer sees their own invoices, newest first, and their latest day of
usage against the license's limits. Real Postgres and JetStream; Stripe's webhooks are signed
bodies shaped as Stripe sends them."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from contracts import (
    CustomerSignedUp,
    Event,
    InvoiceRecorded,
    StripeEventReceived,
    UsageReported,
    decode_envelope,
)
from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.http.auth import SessionTokens
from libs.runtime.platform import Platform
from services.billing.app import BILLING
from services.billing.stripe_payloads import read_webhook
from services.signup.account_view import ACCOUNT_INVOICES, account_view
from services.signup.app import SIGNUP
from services.targets import build_app
from stripe_signing import SECRET, sign
from support import assert_replays_clean, eventually, license_issued, serving

PRICE = "price_starter_m"


@pytest.fixture(scope="module")
async def platform(settings: ServiceSettings, store: EventStore) -> Platform:
    return Platform.from_settings(
        settings, [SIGNUP, BILLING], stripe_webhook_secret=SECRET, stripe_price_starter=PRICE
    )


@pytest.fixture(scope="module")
async def client(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(build_app(platform, "all")) as http:
        await platform.wait_started()
        yield http


@pytest.fixture(scope="module")
async def pool(settings: ServiceSettings) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(
        settings.database_url, min_size=1, max_size=2, server_settings={"search_path": "signup"}
    ) as p:
        yield p


async def new_customer(store: EventStore, pool: asyncpg.Pool, *, license: bool = True) -> str:
    """A customer with an account (and a starter license), as the log tells signup."""
    customer_id = str(uuid.uuid4())
    email = f"{customer_id[:8]}@example.com"
    await store.publish(
        CustomerSignedUp(
            customer_id=customer_id,
            email=email,
            email_display=email,
            company_name="Air Quality Ltd",
            signed_up_at=datetime.now(UTC),
        ),
        customer_id=customer_id,
    )
    if license:
        await store.publish(license_issued(customer_id), customer_id=customer_id)
    # The private state a signup through the API keeps beside the log: a session is honoured
    # only for a customer with credentials.
    await pool.execute(
        "INSERT INTO credentials (customer_id, email, password_hash, confirmed) "
        "VALUES ($1, $2, 'not-a-hash', true)",
        customer_id,
        email,
    )
    await eventually(
        lambda: pool.fetchrow(
            "SELECT license_limits FROM accounts WHERE customer_id = $1", customer_id
        ),
        lambda row: row is not None and (row["license_limits"] is not None or not license),
        what="the account",
    )
    return customer_id


def invoice_recorded(
    customer_id: str, invoice: str, status: str, day: int, created_at: datetime | None = None
) -> InvoiceRecorded:
    return InvoiceRecorded(
        customer_id=customer_id,
        stripe_invoice_id=invoice,
        number=f"INV-{invoice[-4:]}",
        status=status,
        amount=2900,
        currency="eur",
        created_at=created_at or datetime(2026, 11, day, 9, 0, tzinfo=UTC),
        hosted_invoice_url=f"https://invoice.stripe.com/i/acct_1/{invoice}",
    )


def stripe_event(
    event_type: str, obj: dict[str, Any], created: int, evt: str | None = None
) -> bytes:
    return json.dumps(
        {
            "id": evt or f"evt_{uuid.uuid4().hex[:24]}",
            "object": "event",
            "api_version": "2024-06-20",
            "created": created,
            "livemode": False,
            "type": event_type,
            "data": {"object": obj},
        }
    ).encode()


async def send(client: httpx.AsyncClient, payload: bytes) -> None:
    response = await client.post(
        "/webhooks/stripe",
        content=payload,
        headers={"Stripe-Signature": sign(payload), "content-type": "application/json"},
    )
    assert response.status_code in (200, 202), response.text


async def events_of(store: EventStore, event_type: str, customer_id: str) -> list[Any]:
    found = []
    async for message in store.read(event_types=[event_type]):
        envelope = decode_envelope(message.data)
        if envelope.customer_id == customer_id:
            found.append(envelope)
    return found


async def billing_caught_up(settings: ServiceSettings, store: EventStore) -> None:
    """Billing's Stripe reactor has applied every Stripe event on the log, and its outbox is
    empty: whatever it was going to append is on the log."""
    last = 0
    async for message in store.read(event_types=["StripeEventReceived"]):
        last = message.seq
    conn = await asyncpg.connect(settings.database_url)
    try:

        async def state() -> tuple[int, int]:
            seq = await conn.fetchval(
                "SELECT last_seq FROM billing.projection_checkpoints "
                "WHERE projection = 'apply_stripe_events'"
            )
            waiting = await conn.fetchval("SELECT count(*) FROM billing.outbox")
            return int(seq or 0), int(waiting)

        await eventually(state, lambda s: s[0] >= last and s[1] == 0, what="billing caught up")
    finally:
        await conn.close()


async def test_an_invoice_is_recorded_once_however_often_its_webhook_comes(
    client, settings, store, pool
) -> None:
    customer_id = await new_customer(store, pool)
    sub_id, cus = f"sub_{uuid.uuid4().hex[:14]}", f"cus_{uuid.uuid4().hex[:14]}"
    now = int(time.time())
    await send(
        client,
        stripe_event(
            "customer.subscription.created",
            {
                "id": sub_id,
                "object": "subscription",
                "customer": cus,
                "status": "active",
                "current_period_end": now + 30 * 86400,
                "items": {"data": [{"price": {"id": PRICE}}]},
                "metadata": {"customer_id": customer_id},
            },
            now - 10,
        ),
    )
    invoice_id = f"in_{uuid.uuid4().hex[:14]}"
    # invoice.paid as Stripe shapes it (the fields the Stripe stand-in sends too).
    invoice = {
        "id": invoice_id,
        "object": "invoice",
        "number": "A1B2C3D4-0001",
        "status": "paid",
        "amount_paid": 2900,
        "amount_due": 2900,
        "currency": "eur",
        "created": now - 5,
        "hosted_invoice_url": f"https://invoice.stripe.com/i/acct_1/{invoice_id}?s=ap",
        "customer": cus,
        "subscription": sub_id,
    }
    paid = stripe_event("invoice.paid", invoice, now)
    await send(client, paid)
    await send(client, paid)  # Stripe's retry: the gateway stores it once
    # The same webhook stored again past JetStream's 15-minute duplicate window (a new message
    # id and subject), and Stripe's second event for the same payment: nothing new either.
    head, facts = read_webhook(paid, datetime.now(UTC))
    again = StripeEventReceived(
        customer_id=customer_id,
        stripe_event_id=head.id,
        stripe_type=head.type,
        stripe_created=datetime.fromtimestamp(head.created, UTC),
        livemode=False,
        facts=facts,
    )
    await store.publish(again, customer_id=customer_id, key=f"later-{uuid.uuid4().hex[:8]}")
    await send(client, stripe_event("invoice.paid", invoice, now + 1))

    view = await eventually(
        lambda: account_view(pool, customer_id), lambda v: v.invoices, what="the invoice shown"
    )
    await billing_caught_up(settings, store)
    recorded = await events_of(store, "InvoiceRecorded", customer_id)
    assert len(recorded) == 1
    [shown] = (await account_view(pool, customer_id)).invoices
    assert shown == view.invoices[0]
    assert (shown.number, shown.status, shown.amount, shown.currency, shown.url) == (
        "A1B2C3D4-0001",
        "paid",
        2900,
        "eur",
        invoice["hosted_invoice_url"],
    )
    assert shown.created_at == datetime.fromtimestamp(now - 5, UTC)

    # A failed payment of the next invoice is recorded as open, once.
    failed = {
        **invoice,
        "id": f"in_{uuid.uuid4().hex[:14]}",
        "status": "open",
        "number": None,
        "created": now + 2,
    }
    failed.pop("amount_paid")
    failed["hosted_invoice_url"] = None
    await send(client, stripe_event("invoice.payment_failed", failed, now + 2))
    await send(client, stripe_event("invoice.payment_failed", failed, now + 3))
    await eventually(
        lambda: account_view(pool, customer_id),
        lambda v: len(v.invoices) == 2,
        what="the open invoice",
    )
    await billing_caught_up(settings, store)
    assert len(await events_of(store, "InvoiceRecorded", customer_id)) == 2
    newest = (await account_view(pool, customer_id)).invoices[0]
    assert (newest.status, newest.number, newest.url) == ("open", None, None)


async def test_the_account_view_lists_only_the_customers_invoices_newest_first(
    client, settings, store, pool
) -> None:
    ada, bob = await new_customer(store, pool), await new_customer(store, pool)
    # Out of order, and the "open" of an invoice arriving after its "paid".
    for event in (
        invoice_recorded(ada, "in_ada_0002", "paid", 2),
        invoice_recorded(ada, "in_ada_0003", "paid", 3),
        invoice_recorded(ada, "in_ada_0001", "paid", 1),
        invoice_recorded(ada, "in_ada_0003", "open", 3),
        invoice_recorded(bob, "in_bob_0009", "paid", 9),
    ):
        await store.publish(event, customer_id=event.customer_id)
    for customer_id, count in ((ada, 3), (bob, 1)):
        await eventually(
            lambda c=customer_id: account_view(pool, c),
            lambda v, n=count: len(v.invoices) == n,
            what="the invoices",
        )

    token = SessionTokens(settings.session_secret).issue(ada, "ada@example.com")
    response = await client.get("/api/customers/me", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    invoices = response.json()["invoices"]
    assert [i["number"] for i in invoices] == ["INV-0003", "INV-0002", "INV-0001"]
    assert invoices[0] == {
        "number": "INV-0003",
        "status": "paid",
        "amount": 2900,
        "currency": "eur",
        "created_at": "2026-11-03T09:00:00Z",
        "url": "https://invoice.stripe.com/i/acct_1/in_ada_0003",
    }
    assert "in_bob" not in response.text and "INV-0009" not in response.text


async def test_at_most_the_newest_invoices_are_shown(store, pool) -> None:
    customer_id = await new_customer(store, pool, license=False)
    total = ACCOUNT_INVOICES + 3
    first = datetime(2026, 1, 1, tzinfo=UTC)
    for n in range(1, total + 1):
        at = first + timedelta(days=n)
        event = invoice_recorded(customer_id, f"in_many_{n:04d}", "paid", 1, created_at=at)
        await store.publish(event, customer_id=customer_id)
    await eventually(
        lambda: pool.fetchval(
            "SELECT count(*) FROM account_invoices WHERE customer_id = $1", customer_id
        ),
        lambda n: n == total,
        what="every invoice projected",
    )
    shown = (await account_view(pool, customer_id)).invoices
    assert len(shown) == ACCOUNT_INVOICES
    assert shown[0].number == f"INV-{total:04d}"
    assert shown[-1].number == f"INV-{total - ACCOUNT_INVOICES + 1:04d}"


def usage(customer_id: str, day: date, messages: int, final: bool = False) -> UsageReported:
    return UsageReported(
        customer_id=customer_id,
        day=day,
        devices=3,
        mqtt_messages=messages,
        api_requests=messages // 10,
        rejected_readings=0,
        storage_bytes=1024,
        final=final,
    )


async def test_usage_shows_the_newest_day_against_the_license(
    client, settings, store, pool
) -> None:
    customer_id = await new_customer(store, pool)
    other = await new_customer(store, pool)
    today, yesterday = date(2026, 12, 7), date(2026, 12, 6)
    reports: list[Event] = [
        usage(customer_id, today, 500),
        usage(customer_id, yesterday, 9000, final=True),  # late: an older day
        usage(customer_id, today, 800),
        usage(other, today, 1),
    ]
    for report in reports:
        await store.publish(report, customer_id=report.customer_id)  # type: ignore[attr-defined]
    await eventually(
        lambda: pool.fetchval(
            "SELECT messages FROM account_usage WHERE customer_id = $1", customer_id
        ),
        lambda n: n == 800,
        what="the latest report",
    )
    await eventually(
        lambda: pool.fetchval("SELECT count(*) FROM account_usage WHERE customer_id = $1", other),
        lambda n: n == 1,
        what="the other customer's report",
    )
    token = SessionTokens(settings.session_secret).issue(customer_id, "c@example.com")
    response = await client.get("/api/customers/me", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert response.json()["usage"] == {
        "day": "2026-12-07",
        "devices": 3,
        "messages": 800,
        "api_requests": 80,
        "max_devices": 10,
        "messages_per_day": 100_000,
        "api_requests_per_day": 10_000,
    }
    # A customer whose instance has reported nothing has no usage, and no invoices.
    quiet = await new_customer(store, pool, license=False)
    view = await account_view(pool, quiet)
    assert view.usage is None and view.invoices == []


async def test_invoices_usage_and_history_replay_to_the_same_rows(settings, store, pool) -> None:
    await assert_replays_clean(settings.database_url, store, [SIGNUP])
