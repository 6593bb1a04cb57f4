"""Turning stored Stripe events into billing's domain events.

Stripe retries, duplicates and reorders webhooks. Each Stripe event is looked at once (its id is
remembered), and a subscription's state only moves forward: an event older than the newest one
applied to that subscription changes nothing, and a canceled subscription is never revived.
Each state of an invoice (open when a payment failed, paid) is recorded once.
It appends nothing itself: the reactor that calls it (``reactors.py``) puts the events it
returns in the outbox, in the same transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from contracts import (
    Event,
    InvoiceRecorded,
    PaymentFailed,
    StripeEventReceived,
    StripeFacts,
    SubscriptionActivated,
    SubscriptionCanceled,
    SubscriptionChanged,
)
from libs.db.postgres import Connection
from libs.projections.apply import Recorded
from services.billing.settings import BillingSettings
from services.billing.stripe_payloads import UnreadableStripeObject, stored_facts

log = logging.getLogger(__name__)

ACTIVE = ("active", "trialing")
Handler = Callable[[StripeEventReceived, StripeFacts, int], Awaitable[tuple[str, list[Event]]]]


def facts_of(e: StripeEventReceived) -> StripeFacts | None:
    """The facts billing reads of a stored Stripe event: carried by version 2, read out of the
    stored body of version 1 (the same way the gateway reads them now)."""
    if e.facts is not None or e.payload is None:
        return e.facts
    return stored_facts(e.payload, e.stripe_type)


async def remember_customer(
    conn: Connection, stripe_customer: str | None, customer_id: str
) -> None:
    """Map Stripe's customer to ours; the first mapping stays."""
    if stripe_customer:
        await conn.execute(
            "INSERT INTO stripe_customers VALUES ($1, $2) ON CONFLICT DO NOTHING",
            stripe_customer,
            customer_id,
        )


@dataclass(frozen=True)
class SubscriptionSeen:
    """A subscription as one Stripe event shows it."""

    customer_id: str
    subscription: str
    stripe_customer: str
    plan: str
    status: str
    period_end: datetime | None
    # When Stripe made the event (its ``created``, in seconds): older ones change nothing.
    created: int


class StripeTranslator:
    """Decides, for one stored Stripe event, which domain events (if any) it means."""

    def __init__(self, conn: Connection, settings: BillingSettings) -> None:
        """Reads and writes billing's private Stripe tables on ``conn`` (in the apply txn)."""
        self.conn = conn
        self.settings = settings

    async def translate(self, r: Recorded[StripeEventReceived]) -> list[Event]:
        """The domain events this Stripe event means; records that it was looked at."""
        e = r.event
        if await self.conn.fetchval(
            "SELECT 1 FROM stripe_events WHERE stripe_event_id = $1", e.stripe_event_id
        ):
            return []  # the same Stripe event again (stored twice past the duplicate window)
        created = int(e.stripe_created.timestamp())
        handler = self.handlers().get(e.stripe_type)
        try:
            facts = facts_of(e)
        except UnreadableStripeObject as exc:
            # Only a version 1 event can get here (the gateway now refuses such a body): its
            # object says nothing billing can act on. Recorded like an unmatched event.
            log.warning("Stripe event %s: its object does not read: %s", e.stripe_event_id, exc)
            facts = None
        events: list[Event] = []
        if handler is None:
            outcome = "ignored"
        elif facts is None:
            outcome = "unreadable"
        else:
            outcome, events = await handler(e, facts, created)
        await self.conn.execute(
            "INSERT INTO stripe_events (stripe_event_id, stripe_type, outcome, seq) "
            "VALUES ($1, $2, $3, $4)",
            e.stripe_event_id,
            e.stripe_type,
            outcome,
            r.seq,
        )
        return events

    def handlers(self) -> dict[str, Handler]:
        """What each Stripe type billing reads means (the gateway reads the facts of exactly
        these types: ``stripe_payloads.READ_TYPES``)."""
        return {
            "checkout.session.completed": self._checkout_completed,
            "customer.subscription.created": self._subscription_updated,
            "customer.subscription.updated": self._subscription_updated,
            "customer.subscription.deleted": self._subscription_deleted,
            "invoice.paid": self._invoice_paid,
            "invoice.payment_failed": self._payment_failed,
        }

    async def _customer_of(self, facts: StripeFacts) -> str | None:
        if facts.metadata_customer_id is not None:
            return facts.metadata_customer_id
        if facts.customer is None:
            return None
        value = await self.conn.fetchval(
            "SELECT customer_id FROM stripe_customers WHERE stripe_customer_id = $1",
            facts.customer,
        )
        return str(value) if value else None

    def _plan(self, facts: StripeFacts) -> str | None:
        return self.settings.plan_of_price(facts.price) or facts.metadata_plan

    async def _checkout_completed(
        self, e: StripeEventReceived, facts: StripeFacts, created: int
    ) -> tuple[str, list[Event]]:
        # The checkout ties Stripe's customer to ours; the subscription itself (with its price,
        # status and period) arrives in customer.subscription.* events, which carry our id in
        # their metadata, so activation never depends on which of the two came first.
        customer_id = await self._customer_of(facts) or facts.client_reference_id
        if customer_id is None:
            return "unmatched", []
        await remember_customer(self.conn, facts.customer, customer_id)
        return "noted", []

    async def _subscription_updated(
        self, e: StripeEventReceived, facts: StripeFacts, created: int
    ) -> tuple[str, list[Event]]:
        customer_id = await self._customer_of(facts)
        subscription = facts.id
        plan = self._plan(facts)
        stripe_customer = facts.customer
        if customer_id is None or subscription is None or plan is None or stripe_customer is None:
            return "unmatched", []  # every real subscription names its customer, id and price
        await remember_customer(self.conn, stripe_customer, customer_id)
        seen = SubscriptionSeen(
            customer_id=customer_id,
            subscription=subscription,
            stripe_customer=stripe_customer,
            plan=plan,
            status=facts.status or "active",
            period_end=facts.current_period_end,
            created=created,
        )
        return await self._subscription_state(e, seen)

    async def _subscription_state(
        self, e: StripeEventReceived, seen: SubscriptionSeen
    ) -> tuple[str, list[Event]]:
        """Move the subscription forward to what ``seen`` shows, if it is newer."""
        row = await self.conn.fetchrow(
            "SELECT * FROM stripe_subscriptions WHERE stripe_subscription_id = $1 FOR UPDATE",
            seen.subscription,
        )
        if row is None:
            return await self._first_seen(e, seen)
        if row["canceled"] or seen.created < row["last_event_created"]:
            return "stale", []
        period_end = seen.period_end or row["current_period_end"]
        if (seen.plan, seen.status, period_end) == (
            row["plan"],
            row["status"],
            row["current_period_end"],
        ):
            await self._touch(seen.subscription, seen.created)
            return "unchanged", []
        await self.conn.execute(
            "UPDATE stripe_subscriptions SET plan = $2, status = $3, current_period_end = $4, "
            "last_event_created = $5 WHERE stripe_subscription_id = $1",
            seen.subscription,
            seen.plan,
            seen.status,
            period_end,
            seen.created,
        )
        return "changed", [
            SubscriptionChanged(
                customer_id=seen.customer_id,
                plan=seen.plan,  # type: ignore[arg-type]
                previous_plan=row["plan"],
                status=seen.status,
                stripe_subscription_id=seen.subscription,
                current_period_end=period_end,
                stripe_event_id=e.stripe_event_id,
            )
        ]

    async def _first_seen(
        self, e: StripeEventReceived, seen: SubscriptionSeen
    ) -> tuple[str, list[Event]]:
        """A subscription billing has not seen before: it is activated if it is active."""
        if seen.status not in ACTIVE:
            return "not_active", []
        await self.conn.execute(
            "INSERT INTO stripe_subscriptions (stripe_subscription_id, customer_id, "
            "stripe_customer_id, plan, status, current_period_end, last_event_created) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7)",
            seen.subscription,
            seen.customer_id,
            seen.stripe_customer,
            seen.plan,
            seen.status,
            seen.period_end,
            seen.created,
        )
        return "activated", [
            SubscriptionActivated(
                customer_id=seen.customer_id,
                plan=seen.plan,  # type: ignore[arg-type]
                status=seen.status,
                stripe_customer_id=seen.stripe_customer,
                stripe_subscription_id=seen.subscription,
                current_period_end=seen.period_end,
                stripe_event_id=e.stripe_event_id,
            )
        ]

    async def _touch(self, subscription: str, created: int) -> None:
        await self.conn.execute(
            "UPDATE stripe_subscriptions SET last_event_created = GREATEST(last_event_created, $2)"
            " WHERE stripe_subscription_id = $1",
            subscription,
            created,
        )

    async def _subscription_deleted(
        self, e: StripeEventReceived, facts: StripeFacts, created: int
    ) -> tuple[str, list[Event]]:
        subscription = facts.id
        row = await self.conn.fetchrow(
            "SELECT * FROM stripe_subscriptions WHERE stripe_subscription_id = $1 FOR UPDATE",
            subscription,
        )
        if row is None:
            # Deleted before any other event about it arrived: remember it as canceled, so the
            # older created/updated events that come later cannot bring it to life.
            customer_id = await self._customer_of(facts)
            if customer_id is None or subscription is None:
                return "unmatched", []
            await self.conn.execute(
                "INSERT INTO stripe_subscriptions (stripe_subscription_id, customer_id, "
                "stripe_customer_id, plan, status, last_event_created, canceled) "
                "VALUES ($1, $2, $3, $4, 'canceled', $5, true)",
                subscription,
                customer_id,
                facts.customer,
                self._plan(facts) or "starter",
                created,
            )
            return "canceled_unseen", []
        if row["canceled"]:
            return "stale", []
        await self.conn.execute(
            "UPDATE stripe_subscriptions SET canceled = true, status = 'canceled', "
            "last_event_created = GREATEST(last_event_created, $2) "
            "WHERE stripe_subscription_id = $1",
            subscription,
            created,
        )
        canceled_at = facts.canceled_at or e.stripe_created
        return "canceled", [
            SubscriptionCanceled(
                customer_id=row["customer_id"],
                stripe_subscription_id=row["stripe_subscription_id"],
                canceled_at=canceled_at,
                reason=facts.cancellation_reason,
                stripe_event_id=e.stripe_event_id,
            )
        ]

    async def _invoice_paid(
        self, e: StripeEventReceived, facts: StripeFacts, created: int
    ) -> tuple[str, list[Event]]:
        row = await self._subscription_of_invoice(facts)
        invoice = await self._invoice_recorded(e, facts, row, "paid")
        if row is None or row["canceled"] or row["status"] != "past_due":
            return "noted", invoice
        await self.conn.execute(
            "UPDATE stripe_subscriptions SET status = 'active', "
            "last_event_created = GREATEST(last_event_created, $2) "
            "WHERE stripe_subscription_id = $1",
            row["stripe_subscription_id"],
            created,
        )
        return "changed", [
            SubscriptionChanged(
                customer_id=row["customer_id"],
                plan=row["plan"],
                previous_plan=row["plan"],
                status="active",
                stripe_subscription_id=row["stripe_subscription_id"],
                current_period_end=row["current_period_end"],
                stripe_event_id=e.stripe_event_id,
            ),
            *invoice,
        ]

    async def _payment_failed(
        self, e: StripeEventReceived, facts: StripeFacts, created: int
    ) -> tuple[str, list[Event]]:
        row = await self._subscription_of_invoice(facts)
        invoice = await self._invoice_recorded(e, facts, row, "open")
        if row is None or row["canceled"] or facts.id is None:
            return "unmatched", invoice
        await self.conn.execute(
            "UPDATE stripe_subscriptions SET status = 'past_due' "
            "WHERE stripe_subscription_id = $1 AND last_event_created <= $2",
            row["stripe_subscription_id"],
            created,
        )
        return "payment_failed", [
            PaymentFailed(
                customer_id=row["customer_id"],
                stripe_invoice_id=facts.id,
                stripe_subscription_id=row["stripe_subscription_id"],
                amount_due=facts.amount_due or 0,
                currency=facts.currency or "eur",
                attempt_count=1 if facts.attempt_count is None else facts.attempt_count,
                next_payment_attempt=facts.next_payment_attempt,
                stripe_event_id=e.stripe_event_id,
            ),
            *invoice,
        ]

    async def _invoice_recorded(
        self, e: StripeEventReceived, facts: StripeFacts, subscription: Any, status: str
    ) -> list[Event]:
        """The invoice in the state this event shows (``status`` when Stripe names none), once
        per invoice and state: a second Stripe event for the same state, or the same one stored
        again past JetStream's duplicate window, records nothing."""
        customer_id = (
            subscription["customer_id"] if subscription is not None else None
        ) or await self._customer_of(facts)
        if facts.id is None or customer_id is None:
            return []
        state = facts.status or status
        first = await self.conn.fetchval(
            "INSERT INTO stripe_invoices (stripe_invoice_id, status, customer_id) "
            "VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING true",
            facts.id,
            state,
            customer_id,
        )
        if not first:
            return []
        paid = facts.amount_paid if state == "paid" else None
        return [
            InvoiceRecorded(
                customer_id=customer_id,
                stripe_invoice_id=facts.id,
                number=facts.number,
                status=state,
                amount=paid if paid is not None else facts.amount_due or 0,
                currency=facts.currency or "eur",
                created_at=facts.created or e.stripe_created,
                hosted_invoice_url=facts.hosted_invoice_url,
            )
        ]

    async def _subscription_of_invoice(self, facts: StripeFacts) -> Any:
        subscription = facts.subscription
        if subscription is None:
            return None
        return await self.conn.fetchrow(
            "SELECT * FROM stripe_subscriptions WHERE stripe_subscription_id = $1 FOR UPDATE",
            subscription,
        )
