"""The Stripe webhook gateway: verify, keep the body, put its facts on the log once, answer fast.

This is where ``StripeEventReceived`` is appended, once per Stripe event id. It does no business
logic: the billing service turns stored Stripe events into domain events from the log, where a
retried, duplicated or reordered webhook is just another event to judge. The body as sent stays
in billing's own table (``stripe_payloads``); the log gets only the facts billing reads
(``services/billing/stripe_payloads.py``).
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from prometheus_client import CollectorRegistry, Counter
from stripe import SignatureVerificationError, WebhookSignature

from contracts import StripeEventReceived, StripeFacts
from libs.eventlog.errors import ConcurrencyConflict
from libs.eventlog.store import EventStore
from libs.http.errors import DomainError, InvalidRequest
from services.billing.stripe_payloads import (
    StripeEventHead,
    customer_hint,
    keep_payload,
    read_webhook,
)


class WebhookNotConfigured(DomainError):
    """503: no STRIPE_WEBHOOK_SECRET, so no webhook can be trusted."""

    status_code = 503
    code = "webhook_not_configured"


class WebhookTooLarge(DomainError):
    """413: a body over STRIPE_WEBHOOK_MAX_BYTES; it is read no further and stored nowhere."""

    status_code = 413
    code = "too_large"


@functools.cache
def webhook_metrics(registry: CollectorRegistry) -> WebhookMetrics:
    """The webhook counters of a process's registry (the gateway and the reactor share them)."""
    return WebhookMetrics(registry)


class WebhookMetrics:
    """Webhooks received, rejected, duplicated and processed, by Stripe event type."""

    def __init__(self, registry: CollectorRegistry) -> None:
        """Register the counters on ``registry``."""
        self.webhooks = Counter(
            "iotistic_stripe_webhooks_total",
            "Stripe webhooks by outcome (received, duplicate, rejected, processed) and type",
            ("outcome", "type"),
            registry=registry,
        )


@dataclass(frozen=True)
class Received:
    """What the gateway did with a webhook."""

    stripe_event_id: str
    stripe_type: str
    duplicate: bool


def verify(
    payload: bytes, signature: str | None, secret: str, tolerance: int
) -> tuple[StripeEventHead, StripeFacts | None]:
    """The event and its facts, if ``signature`` is Stripe's for this payload and recent; else
    a 400 (naming the field, for a signed body billing cannot read)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("webhook body is not UTF-8") from None
    if not signature:
        raise InvalidRequest("missing Stripe-Signature header")
    try:
        WebhookSignature.verify_header(text, signature, secret, tolerance)
    except SignatureVerificationError as exc:
        # Stripe's message says which check failed (no signature, timestamp outside tolerance).
        raise InvalidRequest(f"invalid Stripe-Signature: {exc.user_message or exc}") from None
    return read_webhook(payload, datetime.now(UTC))


async def receive_webhook(
    store: EventStore,
    db: asyncpg.Pool,
    payload: bytes,
    signature: str | None,
    *,
    secret: str | None,
    tolerance: int,
    metrics: WebhookMetrics,
) -> Received:
    """Verify a webhook, keep its body, and put its facts on the log once per Stripe event id."""
    if not secret:
        metrics.webhooks.labels("rejected", "unknown").inc()
        raise WebhookNotConfigured("STRIPE_WEBHOOK_SECRET is not set; webhooks are refused")
    try:
        head, facts = verify(payload, signature, secret, tolerance)
    except InvalidRequest:
        metrics.webhooks.labels("rejected", "unknown").inc()
        raise
    event = StripeEventReceived(
        customer_id=facts.metadata_customer_id if facts is not None else customer_hint(head),
        stripe_event_id=head.id,
        stripe_type=head.type,
        stripe_created=datetime.fromtimestamp(head.created, UTC),
        livemode=head.livemode,
        api_version=head.api_version,
        facts=facts,
    )
    # Kept before it is announced: a retry after a failed append finds the body kept already.
    await keep_payload(db, head, payload)
    try:
        # One subject per Stripe event: the first delivery is stored, every retry conflicts.
        await store.publish(
            event,
            customer_id=event.customer_id,
            key=stripe_key(head.id),
            expected_last_subject_seq=0,
            event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"stripe:{head.id}")),
        )
    except ConcurrencyConflict:
        metrics.webhooks.labels("duplicate", head.type).inc()
        return Received(head.id, head.type, duplicate=True)
    metrics.webhooks.labels("received", head.type).inc()
    return Received(head.id, head.type, duplicate=False)


def stripe_key(stripe_event_id: str) -> str:
    """The subject key of a Stripe event id (``evt_...``), made safe for a NATS subject."""
    safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in stripe_event_id)[:100]
    if not safe:
        raise InvalidRequest("Stripe event without an id")
    return safe
