"""Stripe's webhook bodies: read strictly into the facts billing keeps, and kept raw a while.

The log carries only ``StripeFacts``: ids, states, amounts and times. The body as Stripe sent
it, with whatever personal data it holds (names, emails, addresses, card details), is private
state of billing, like signup's password hashes: one row per Stripe event in
``stripe_payloads``, deleted ``STRIPE_PAYLOAD_RETENTION_DAYS`` after it arrived. Nothing reads a
row back to decide anything, so neither a purge nor a replay changes what billing knows.

Reading is strict. A fact billing reads that is not what Stripe documents (a time that is not
a whole number of seconds between 1970 and 9999, a negative amount, an id with spaces) refuses
the whole event with a 400 naming the field, so nothing absurd reaches the log.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

import asyncpg
import msgspec
from msgspec import Meta, Struct

from contracts import StripeFacts
from contracts.events import Currency, InvoiceNumber, InvoiceUrl, MinorUnits, StripeRef, StripeWord
from libs.http.errors import InvalidRequest

# The Stripe event types whose object billing reads (services/billing/stripe_events.py turns
# them into domain events). Of every other type only the envelope's facts are kept.
READ_TYPES = frozenset(
    {
        "checkout.session.completed",
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "invoice.paid",
        "invoice.payment_failed",
    }
)
PAID_PLANS = ("starter", "professional", "enterprise")
# 9999-12-31T23:59:59Z: the last second a datetime (and so every event time) can hold.
MAX_UNIX_TIME = 253_402_300_799
# Stripe stamps `created` when it makes the event; a day covers any clock skew between us.
FUTURE_SKEW = timedelta(days=1)
PURGE_BATCH = 1000

UnixTime = Annotated[
    int, Meta(ge=0, le=MAX_UNIX_TIME, description="whole seconds since 1970 (until 9999)")
]


class _EventData(Struct, frozen=True, kw_only=True):
    # Left raw: only the types billing reads have their object read (strictly).
    object: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"{}"))


class StripeEventHead(Struct, frozen=True, kw_only=True):
    """The parts of a Stripe event every webhook must get right; ``data`` stays raw."""

    id: Annotated[str, Meta(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_-]+$")]
    type: Annotated[str, Meta(min_length=1, max_length=100, pattern=r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")]
    created: UnixTime
    livemode: bool = False
    api_version: Annotated[str, Meta(max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] | None = None
    data: _EventData | None = None


class _Metadata(Struct, frozen=True, kw_only=True):
    customer_id: StripeRef | None = None
    # Only our plan names mean anything here (the price decides first); others are ignored.
    plan: str | None = None


class _Price(Struct, frozen=True, kw_only=True):
    id: StripeRef | None = None


class _Item(Struct, frozen=True, kw_only=True):
    price: _Price | None = None


class _Items(Struct, frozen=True, kw_only=True):
    data: list[_Item] = msgspec.field(default_factory=list)


class _CancellationDetails(Struct, frozen=True, kw_only=True):
    reason: StripeWord | None = None


class _StripeObject(Struct, frozen=True, kw_only=True):
    """The fields of a subscription, invoice or checkout session that billing reads."""

    id: StripeRef | None = None
    customer: StripeRef | None = None
    metadata: _Metadata | None = None
    client_reference_id: StripeRef | None = None
    subscription: StripeRef | None = None
    status: StripeWord | None = None
    items: _Items | None = None
    current_period_end: UnixTime | None = None
    canceled_at: UnixTime | None = None
    cancellation_details: _CancellationDetails | None = None
    amount_due: MinorUnits | None = None
    currency: Currency | None = None
    attempt_count: Annotated[int, Meta(ge=0, le=2**31 - 1)] | None = None
    next_payment_attempt: UnixTime | None = None
    number: InvoiceNumber | None = None
    amount_paid: MinorUnits | None = None
    created: UnixTime | None = None
    hosted_invoice_url: InvoiceUrl | None = None


class _Body(Struct, frozen=True, kw_only=True):
    data: _EventData | None = None


_HEAD = msgspec.json.Decoder(StripeEventHead)
_BODY = msgspec.json.Decoder(_Body)
_OBJECT = msgspec.json.Decoder(_StripeObject)
_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_MISSING = re.compile(r"^Object missing required field `(?P<name>[^`]+)`")
_REF = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


class UnreadableStripeObject(ValueError):
    """A stored body whose object does not read as Stripe documents it (old events only)."""


def read_webhook(body: bytes, now: datetime) -> tuple[StripeEventHead, StripeFacts | None]:
    """The event's head and, for the types billing reads, its facts; else a 400 naming the
    field. ``now`` bounds ``created``: Stripe cannot have made the event tomorrow."""
    try:
        head = _HEAD.decode(body)
    except msgspec.ValidationError as exc:
        raise _invalid(exc, "") from None
    except msgspec.DecodeError:
        raise InvalidRequest(
            "webhook body is not JSON", fields=[{"field": "body", "reason": "is not JSON"}]
        ) from None
    except RecursionError:
        raise _too_deep() from None
    if head.created > (now + FUTURE_SKEW).timestamp():
        raise InvalidRequest(
            "webhook body is not a Stripe event billing can read",
            fields=[{"field": "created", "reason": "is more than a day in the future"}],
        )
    if head.type not in READ_TYPES:
        return head, None
    try:
        return head, _facts(_OBJECT.decode((head.data or _EventData()).object))
    except msgspec.ValidationError as exc:
        raise _invalid(exc, "data.object") from None
    except RecursionError:
        raise _too_deep() from None


def stored_facts(payload: str, stripe_type: str) -> StripeFacts | None:
    """The facts of a body stored on the log by version 1 of the gateway, read as the gateway
    reads them now. Raises ``UnreadableStripeObject`` for an object that does not read."""
    if stripe_type not in READ_TYPES:
        return None
    try:
        body = _BODY.decode(payload)
        return _facts(_OBJECT.decode((body.data or _EventData()).object))
    except (msgspec.DecodeError, RecursionError) as exc:
        raise UnreadableStripeObject(str(exc)) from None


def customer_hint(head: StripeEventHead) -> str | None:
    """Our customer id from ``data.object.metadata.customer_id`` of any Stripe type, if it is
    an id (never anything else of the object)."""
    if head.data is None:
        return None
    try:
        obj = msgspec.json.decode(head.data.object)
    except (msgspec.DecodeError, RecursionError):
        return None
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    value = metadata.get("customer_id") if isinstance(metadata, dict) else None
    return value if isinstance(value, str) and _REF.match(value) else None


def _facts(obj: _StripeObject) -> StripeFacts:
    metadata = obj.metadata or _Metadata()
    first = obj.items.data[0] if obj.items is not None and obj.items.data else None
    return StripeFacts(
        id=obj.id,
        customer=obj.customer,
        metadata_customer_id=metadata.customer_id,
        metadata_plan=metadata.plan if metadata.plan in PAID_PLANS else None,  # type: ignore[arg-type]
        client_reference_id=obj.client_reference_id,
        subscription=obj.subscription,
        status=obj.status,
        price=first.price.id if first is not None and first.price is not None else None,
        current_period_end=_time(obj.current_period_end),
        canceled_at=_time(obj.canceled_at),
        cancellation_reason=obj.cancellation_details.reason if obj.cancellation_details else None,
        amount_due=obj.amount_due,
        currency=obj.currency,
        attempt_count=obj.attempt_count,
        next_payment_attempt=_time(obj.next_payment_attempt),
        number=obj.number,
        amount_paid=obj.amount_paid,
        created=_time(obj.created),
        hosted_invoice_url=obj.hosted_invoice_url,
    )


def _time(value: int | None) -> datetime | None:
    return datetime.fromtimestamp(value, UTC) if value is not None else None


def _too_deep() -> InvalidRequest:
    # msgspec gives up on JSON nested deeper than Python's recursion limit (about a thousand).
    return InvalidRequest(
        "webhook body is not a Stripe event billing can read",
        fields=[{"field": "body", "reason": "is nested too deeply"}],
    )


def _invalid(exc: msgspec.ValidationError, prefix: str) -> InvalidRequest:
    """A 400 naming the field msgspec found wrong (``data.object.amount_due``, say)."""
    message = str(exc)
    at = _AT.search(message)
    path = at["path"] if at else ""
    reason = message[: at.start()] if at else message
    missing = _MISSING.match(reason)
    if missing:
        path, reason = f"{path}.{missing['name']}", "is required"
    parts = [part for part in (prefix, path.lstrip(".")) if part]
    field = ".".join(parts) or "body"
    return InvalidRequest(
        "webhook body is not a Stripe event billing can read",
        fields=[{"field": field, "reason": reason}],
    )


# --- the raw bodies, private to billing ---------------------------------------------------------


async def keep_payload(pool: asyncpg.Pool, head: StripeEventHead, body: bytes) -> None:
    """Keep the body as Stripe sent it; the first delivery's copy stays."""
    await pool.execute(
        "INSERT INTO stripe_payloads (stripe_event_id, stripe_type, payload) VALUES ($1, $2, $3) "
        "ON CONFLICT (stripe_event_id) DO NOTHING",
        head.id,
        head.type,
        body,
    )


async def purge_payloads(pool: asyncpg.Pool, retention_days: float) -> int:
    """Delete the bodies that arrived more than ``retention_days`` ago (by the database's
    clock); returns how many."""
    purged = 0
    while True:
        async with pool.acquire() as conn:
            status = await conn.execute(
                "DELETE FROM stripe_payloads WHERE stripe_event_id IN ("
                "  SELECT stripe_event_id FROM stripe_payloads"
                "  WHERE received_at < now() - make_interval(secs => $1)"
                "  ORDER BY received_at LIMIT $2)",
                retention_days * 86400.0,
                PURGE_BATCH,
            )
        deleted = int(status.rsplit(" ", 1)[-1])
        purged += deleted
        if deleted < PURGE_BATCH:
            return purged
