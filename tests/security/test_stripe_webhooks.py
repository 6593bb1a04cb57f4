"""Attacks on the Stripe webhook gateway (issue 11: items 7, 9 and 13), against the real servers.

Every webhook here is signed exactly as Stripe signs it, so each one is what an attacker who
holds (or replays within tolerance) a valid signature, or Stripe itself on a bad day, can send:

- a body the bus could never carry answers 413 at once and is stored nowhere (no 503 loop);
- absurd numbers answer 400 naming the field, never 500;
- no name, email, address, phone, card detail or free text of a payload reaches the log; the
  body stays in billing's own table until its retention ends, and billing rebuilds and
  re-derives everything from the facts on the log alone.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from contracts import (
    Envelope,
    StripeEventReceived,
    TraceContext,
    decode_envelope,
    decode_event,
    encode_envelope,
    new_envelope,
)
from libs.config import ServiceSettings
from libs.db.postgres import create_pool, migrate, service_migrations
from libs.eventlog.reader import StoredMessage
from libs.eventlog.store import EventStore
from libs.projections.apply import Recorded
from libs.projections.replay import replay_service
from libs.runtime.platform import Platform
from services.billing.app import BILLING
from services.billing.settings import BillingSettings
from services.billing.stripe_events import StripeTranslator
from services.billing.webhooks import stripe_key
from services.targets import build_app
from stripe_signing import SECRET, sign
from support import create_database, eventually, serving

PRICES = {"starter": "price_starter_m", "professional": "price_pro_m", "enterprise": "price_ent_m"}
# Short enough to watch the purge happen, long enough to see the body kept first.
RETENTION_SECONDS = 6.0
DERIVED = (
    "SubscriptionActivated",
    "SubscriptionChanged",
    "SubscriptionCanceled",
    "PaymentFailed",
    "InvoiceRecorded",
)

# Personal data Stripe puts in its objects; none of it may reach the log.
EMAIL = "ada.lovelace.4f7c@analytical-engines.example"
NAME = "Augusta Ada King-Noel"
STREET = "12 St James Square"
CITY = "Marylebone"
PHONE = "+44 20 7946 0958"
FINGERPRINT = "Xq7AdaCardFingerprint"
FREE_TEXT = "Please call Ada about the Analytical Engine"
PERSONAL = (EMAIL, NAME, STREET, CITY, PHONE, FINGERPRINT, FREE_TEXT)


@pytest.fixture(scope="module")
async def platform(settings: ServiceSettings, store: EventStore) -> Platform:
    return Platform.from_settings(
        settings,
        [BILLING],
        stripe_webhook_secret=SECRET,
        stripe_price_starter=PRICES["starter"],
        stripe_price_professional=PRICES["professional"],
        stripe_price_enterprise=PRICES["enterprise"],
        stripe_payload_retention_days=RETENTION_SECONDS / 86400,
        stripe_payload_purge_seconds=0.2,
    )


@pytest.fixture(scope="module")
async def client(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(build_app(platform, "billing")) as http:
        await platform.wait_started()
        yield http


@pytest.fixture(scope="module")
async def db(settings: ServiceSettings, client: httpx.AsyncClient) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        yield conn
    finally:
        await conn.close()


def event(event_type: str, obj: dict[str, Any], created: int | None = None, **top: Any) -> dict:
    return {
        "id": f"evt_{uuid.uuid4().hex[:24]}",
        "object": "event",
        "api_version": "2024-06-20",
        "created": int(time.time()) if created is None else created,
        "livemode": False,
        "type": event_type,
        "data": {"object": obj},
        **top,
    }


def subscription(customer_id: str, sub_id: str, plan: str = "professional", **extra: Any) -> dict:
    return {
        "id": sub_id,
        "object": "subscription",
        "customer": "cus_" + sub_id[4:],
        "status": "active",
        "current_period_end": int(time.time()) + 30 * 86400,
        "items": {"object": "list", "data": [{"id": "si_1", "price": {"id": PRICES[plan]}}]},
        "metadata": {"customer_id": customer_id},
        **extra,
    }


def invoice(sub_id: str, **extra: Any) -> dict:
    return {
        "id": f"in_{uuid.uuid4().hex[:14]}",
        "object": "invoice",
        "subscription": sub_id,
        "amount_due": 4900,
        "currency": "eur",
        "attempt_count": 1,
        "next_payment_attempt": int(time.time()) + 3 * 86400,
        **extra,
    }


def encode(body: dict) -> bytes:
    return json.dumps(body).encode()


def padded(body: dict, size: int) -> bytes:
    """``body`` grown to exactly ``size`` bytes by a free-text field billing never reads."""
    body = {**body, "data": {"object": {**body["data"]["object"], "description": ""}}}
    short = size - len(encode(body))
    assert short >= 0
    body["data"]["object"]["description"] = "x" * short
    raw = encode(body)
    assert len(raw) == size
    return raw


async def post(client: httpx.AsyncClient, body: Any, signature: str | None) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    return await client.post("/webhooks/stripe", content=body, headers=headers)


async def send(client: httpx.AsyncClient, *bodies: bytes) -> None:
    for body in bodies:
        response = await post(client, body, sign(body))
        assert response.status_code == 200, response.text


async def kept(db: Any, stripe_event_id: str) -> bytes | None:
    return await db.fetchval(
        "SELECT payload FROM billing.stripe_payloads WHERE stripe_event_id = $1", stripe_event_id
    )


async def messages(store: EventStore) -> list[StoredMessage]:
    return [message async for message in store.read()]


async def stored(store: EventStore, stripe_event_id: str) -> list[StoredMessage]:
    subject = store.subject("StripeEventReceived", stripe_key(stripe_event_id))
    return [m for m in await messages(store) if m.subject == subject]


def limit_of(platform: Platform) -> int:
    return platform.runtime_of("billing").settings_as(BillingSettings).stripe_webhook_max_bytes


# --- 9: a body the bus cannot carry -------------------------------------------------------------


@pytest.mark.parametrize("how", ["content-length", "chunked"])
async def test_a_signed_1_mb_webhook_gets_413_at_once_and_is_stored_nowhere(
    client, db, store: EventStore, how: str
) -> None:
    body = event("customer.subscription.created", subscription("cust-big", "sub_big1"))
    raw = padded(body, 1024 * 1024)
    before = await store.last_seq()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 64 * 1024):
            yield raw[start : start + 64 * 1024]

    response = await post(client, raw if how == "content-length" else chunks(), sign(raw))

    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "too_large"
    assert "STRIPE_WEBHOOK_MAX_BYTES" in error["message"]
    assert await store.last_seq() == before
    assert await kept(db, body["id"]) is None


async def test_a_webhook_of_exactly_the_limit_is_kept_and_its_facts_stored(
    client, db, platform, store: EventStore
) -> None:
    limit = limit_of(platform)
    body = event("customer.subscription.created", subscription("cust-edge", "sub_edge1"))
    raw = padded(body, limit)

    response = await post(client, raw, sign(raw))

    assert response.status_code == 200, response.text
    assert await kept(db, body["id"]) == raw
    [message] = await stored(store, body["id"])
    assert len(message.data) < 4096  # the facts, not the body
    received = decode_event(decode_envelope(message.data))
    assert isinstance(received, StripeEventReceived)
    assert received.payload is None
    assert received.facts is not None and received.facts.id == "sub_edge1"

    over = padded(event("customer.subscription.created", subscription("c", "sub_o")), limit + 1)
    assert (await post(client, over, sign(over))).status_code == 413


async def test_the_largest_event_a_webhook_can_append_fits_in_one_nats_message(
    store: EventStore, nc
) -> None:
    from contracts import StripeFacts
    from services.billing.settings import STRIPE_EVENT_RESERVE

    # Every string at its longest, every time with microseconds, and the largest trace context
    # OpenTelemetry passes on from a caller (8192 characters, each one escaped in JSON).
    longest, latest = "A" * 255, datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    facts = StripeFacts(
        **{name: longest for name in _ID_FACTS},
        metadata_plan="professional",
        status="z" * 64,
        cancellation_reason="z" * 64,
        current_period_end=latest,
        canceled_at=latest,
        next_payment_attempt=latest,
        amount_due=2**53 - 1,
        currency="eur",
        attempt_count=2**31 - 1,
    )
    event_id = "evt_" + "A" * 96
    worst = StripeEventReceived(
        customer_id=longest,
        stripe_event_id=event_id,
        stripe_type="a" * 100,
        stripe_created=latest,
        livemode=True,
        api_version="A" * 64,
        facts=facts,
    )
    tracestate = ",".join(f"k{i:02d}=" + '"' * 252 for i in range(32))[:8192]
    envelope = new_envelope(
        worst,
        customer_id=longest,
        trace=TraceContext(
            traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01", tracestate=tracestate
        ),
    )
    headers = {
        "Nats-Msg-Id": envelope.event_id,
        "Iotistic-Event-Type": envelope.type,
        "traceparent": envelope.trace.traceparent,
        "tracestate": tracestate,
        "Nats-Expected-Last-Subject-Sequence": "0",
    }
    header_bytes = len("NATS/1.0\r\n\r\n") + sum(len(f"{k}: {v}\r\n") for k, v in headers.items())
    assert len(encode_envelope(envelope)) + header_bytes <= STRIPE_EVENT_RESERVE
    assert BillingSettings().stripe_webhook_max_bytes + STRIPE_EVENT_RESERVE <= nc.max_payload
    appended = await store.append(envelope, key=stripe_key(event_id), expected_last_subject_seq=0)
    [message] = await stored(store, event_id)
    assert message.seq == appended.seq
    assert decode_event(decode_envelope(message.data)) == worst


_ID_FACTS = (
    "id",
    "customer",
    "metadata_customer_id",
    "client_reference_id",
    "subscription",
    "price",
)


# --- 7: absurd values ---------------------------------------------------------------------------


def with_value(body: dict, path: str, value: Any) -> dict:
    target = body
    *parents, last = path.split(".")
    for name in parents:
        target = target[name]
    target[last] = value
    return body


ABSURD = [
    ("created", 10**30, "subscription"),
    ("created", int(1e30), "invoice"),
    ("created", 1e30, "subscription"),
    ("created", -1, "subscription"),
    ("created", 1.5, "subscription"),
    ("created", "1700000000", "subscription"),
    ("created", int(time.time()) + 30 * 86400, "subscription"),
    ("created", 10**30, "unknown"),
    ("data.object.current_period_end", 10**30, "subscription"),
    ("data.object.current_period_end", -86400, "subscription"),
    ("data.object.current_period_end", 1.5e9, "subscription"),
    ("data.object.canceled_at", 10**30, "deleted"),
    ("data.object.amount_due", -5, "invoice"),
    ("data.object.amount_due", 12.5, "invoice"),
    ("data.object.amount_due", 2**64, "invoice"),
    ("data.object.attempt_count", 10**30, "invoice"),
    ("data.object.next_payment_attempt", 10**30, "invoice"),
    ("data.object.next_payment_attempt", "tomorrow", "invoice"),
]


def absurd_event(kind: str) -> dict:
    sub = f"sub_{uuid.uuid4().hex[:14]}"
    return {
        "subscription": lambda: event("customer.subscription.updated", subscription("c-a", sub)),
        "deleted": lambda: event("customer.subscription.deleted", subscription("c-a", sub)),
        "invoice": lambda: event("invoice.payment_failed", invoice(sub)),
        "unknown": lambda: event("radar.early_fraud_warning.created", {"id": "issfr_1"}),
    }[kind]()


async def settled_seq(store: EventStore) -> int:
    """The log's last sequence once nothing has been appended for half a second: billing derives
    events from the earlier tests' webhooks in the background, and under load they land late."""
    last = await store.last_seq()
    while True:
        await asyncio.sleep(0.5)
        now = await store.last_seq()
        if now == last:
            return now
        last = now


@pytest.mark.parametrize(("field", "value", "kind"), ABSURD, ids=lambda v: str(v)[:24])
async def test_an_absurd_number_in_a_signed_webhook_gets_400_naming_it(
    client, db, store: EventStore, field: str, value: Any, kind: str
) -> None:
    body = with_value(absurd_event(kind), field, value)
    raw = encode(body)
    before = await settled_seq(store)

    response = await post(client, raw, sign(raw))

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert [f["field"] for f in error.get("fields", [])] == [field], error
    assert "Traceback" not in response.text
    assert await store.last_seq() == before
    assert await kept(db, body["id"]) is None


@pytest.mark.parametrize("kind", ["invoice", "unknown"])
async def test_a_signed_webhook_nested_too_deeply_gets_400_not_500(
    client, db, store: EventStore, kind: str
) -> None:
    body = absurd_event(kind)
    raw = encode(body).replace(
        b'"data": {', b'"data": {"deep": ' + b"[" * 5000 + b"]" * 5000 + b", "
    )
    before = await store.last_seq()

    response = await post(client, raw, sign(raw))

    assert response.status_code == 400, response.text
    assert response.json()["error"]["fields"] == [
        {"field": "body", "reason": "is nested too deeply"}
    ]
    assert await store.last_seq() == before
    assert await kept(db, body["id"]) is None


# --- 13: personal data stays off the log --------------------------------------------------------


def with_personal_data(customer_id: str, sub_id: str) -> list[bytes]:
    person = {
        "email": EMAIL,
        "name": NAME,
        "phone": PHONE,
        "address": {"line1": STREET, "city": CITY, "postal_code": "SW1Y 4LE", "country": "GB"},
    }
    card = {"brand": "visa", "last4": "0058", "exp_month": 12, "fingerprint": FINGERPRINT}
    now = int(time.time())
    checkout = {
        "id": f"cs_test_{uuid.uuid4().hex}",
        "object": "checkout.session",
        "customer": "cus_" + sub_id[4:],
        "subscription": sub_id,
        "client_reference_id": customer_id,
        "customer_email": EMAIL,
        "customer_details": person,
        "metadata": {"customer_id": customer_id, "note": FREE_TEXT},
        "status": "complete",
    }
    created = subscription(
        customer_id,
        sub_id,
        description=FREE_TEXT,
        default_payment_method={"id": "pm_1", "billing_details": person, "card": card},
    )
    failed = invoice(
        sub_id,
        customer_email=EMAIL,
        customer_name=NAME,
        customer_phone=PHONE,
        customer_address=person["address"],
        footer=FREE_TEXT,
    )
    return [
        encode(event("checkout.session.completed", checkout, now)),
        encode(event("customer.subscription.created", created, now + 1)),
        encode(event("invoice.payment_failed", failed, now + 2)),
        encode(event("customer.updated", {"id": "cus_x", **person}, now + 3)),
    ]


def assert_no_personal_data(message: StoredMessage) -> None:
    raw = message.data + json.dumps(message.headers).encode()
    found = [marker for marker in PERSONAL if marker.encode() in raw]
    assert not found, (message.subject, found)


async def subscription_status(db: Any, customer_id: str) -> str | None:
    return await db.fetchval(
        "SELECT status FROM billing.subscriptions WHERE customer_id = $1", customer_id
    )


async def test_the_log_keeps_no_personal_data_and_the_raw_body_is_purged_after_retention(
    client, db, store: EventStore
) -> None:
    customer_id, sub_id = str(uuid.uuid4()), f"sub_{uuid.uuid4().hex[:14]}"
    bodies = with_personal_data(customer_id, sub_id)
    ids = [json.loads(body)["id"] for body in bodies]

    await send(client, *bodies)

    # What the gateway appended carries none of it...
    for stripe_id in ids:
        [message] = await stored(store, stripe_id)
        assert_no_personal_data(message)
    # ...billing keeps each body as Stripe sent it, in its own table...
    assert [await kept(db, stripe_id) for stripe_id in ids] == bodies
    # ...and acts on the facts (activated, then past due); what it appends carries none either.
    await eventually(
        lambda: subscription_status(db, customer_id),
        lambda status: status == "past_due",
        what="billing acting on the facts",
    )
    log = await messages(store)
    assert len([m for m in log if m.event_type in DERIVED]) >= 2
    for message in log:
        assert_no_personal_data(message)
    # ...until its retention is over.
    await eventually(
        lambda: db.fetchval(
            "SELECT count(*) FROM billing.stripe_payloads WHERE stripe_event_id = ANY($1)", ids
        ),
        lambda left: left == 0,
        timeout=RETENTION_SECONDS + 30,
        what="the raw bodies purged",
    )


# --- replay: the facts on the log are enough ----------------------------------------------------


async def rows(db: Any, customer_ids: list[str]) -> list[dict[str, Any]]:
    found = await db.fetch(
        "SELECT * FROM billing.subscriptions WHERE customer_id = ANY($1) ORDER BY customer_id",
        customer_ids,
    )
    return [dict(row) for row in found]


async def test_billing_rebuilds_and_rederives_everything_from_the_facts_alone(
    client, db, platform, store: EventStore, postgres_server_url: str
) -> None:
    now = int(time.time())
    customers = [str(uuid.uuid4()) for _ in range(3)]
    subs = [f"sub_{uuid.uuid4().hex[:14]}" for _ in customers]
    first, second, third = zip(customers, subs, strict=True)
    await send(
        client,
        encode(event("customer.subscription.created", subscription(*first), now)),
        encode(event("customer.subscription.updated", subscription(*first, "enterprise"), now + 1)),
        encode(event("customer.subscription.created", subscription(*second, "starter"), now)),
        encode(event("invoice.payment_failed", invoice(second[1]), now + 1)),
        encode(event("customer.subscription.created", subscription(*third), now)),
        encode(
            event(
                "customer.subscription.deleted",
                subscription(*third, canceled_at=now + 2, status="canceled"),
                now + 2,
            )
        ),
    )
    expected = {customers[0]: "active", customers[1]: "past_due", customers[2]: "canceled"}
    await eventually(
        lambda: rows(db, customers),
        lambda found: {r["customer_id"]: r["status"] for r in found} == expected,
        what="the three subscriptions",
    )
    log = await messages(store)
    received = [m for m in log if m.event_type == "StripeEventReceived"]
    for message in received:
        body = decode_event(decode_envelope(message.data))
        assert isinstance(body, StripeEventReceived) and body.payload is None
    await eventually(
        lambda: db.fetchval("SELECT count(*) FROM billing.stripe_payloads"),
        lambda left: left == 0,
        timeout=RETENTION_SECONDS + 30,
        what="every raw body purged",
    )
    # Every stored Stripe event looked at by the live billing, so its answers are all on the log.
    await eventually(
        lambda: db.fetchval("SELECT count(*) FROM billing.stripe_events"),
        lambda seen: seen == len(received),
        what="billing through every stored Stripe event",
    )
    log = await messages(store)

    # The read models, rebuilt from the log with no raw body anywhere, are the live ones.
    before = await rows(db, customers)
    report = await replay_service(
        db,
        store,
        schema=BILLING.schema,
        migrations_package=BILLING.migrations_package,
        projections=BILLING.projections,
        verify=False,
    )
    assert report.events_applied > 0
    assert await rows(db, customers) == before

    # And billing's reading of Stripe, run afresh over the facts on the log, decides exactly
    # the domain events the live billing appended.
    derived = await rederive(postgres_server_url, platform, log)
    appended = [
        (envelope.type, envelope.causation_id, msgspec.json.decode(envelope.data))
        for envelope in (decode_envelope(m.data) for m in log if m.event_type in DERIVED)
    ]
    assert derived == appended
    assert {kind for kind, _, _ in derived} == set(DERIVED)


async def rederive(
    server_url: str, platform: Platform, log: list[StoredMessage]
) -> list[tuple[str, str, Any]]:
    """The domain events a fresh StripeTranslator (on a database of its own) makes of the
    StripeEventReceived events on the log, in log order."""
    settings = platform.runtime_of("billing").settings_as(BillingSettings)
    url = await create_database(server_url)
    pool = await create_pool(url, BILLING.schema)
    derived: list[tuple[str, str, Any]] = []
    try:
        async with pool.acquire() as conn:
            await migrate(conn, BILLING.schema, service_migrations(BILLING.migrations_package))
            for message in log:
                if message.event_type != "StripeEventReceived":
                    continue
                envelope: Envelope = decode_envelope(message.data)
                event = decode_event(envelope)
                assert isinstance(event, StripeEventReceived)
                async with conn.transaction():
                    made = await StripeTranslator(conn, settings).translate(
                        Recorded(seq=message.seq, envelope=envelope, event=event)
                    )
                derived.extend(
                    (e.TYPE, envelope.event_id, msgspec.json.decode(msgspec.json.encode(e)))
                    for e in made
                )
    finally:
        await pool.close()
    return derived
