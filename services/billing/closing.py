"""A closed account's subscription is canceled at Stripe, whichever reaches billing first.

Signup refuses to close an account while a subscription is active or past due, but a checkout
that raced the closure can still start one. The ``cancel_closed_subscriptions`` reactor reads the
closure and the subscription's events in log order and keeps what it saw in
``closed_subscriptions``, with its checkpoint; so it decides from its own state, never a read
model that may lag. When the account is closed and its subscription still bills, it cancels the
subscription at Stripe (``StripeGateway.cancel_subscription``, idempotent per subscription), and
Stripe's ``customer.subscription.deleted`` webhook brings the ``SubscriptionCanceled`` as for
any cancellation. A failed call raises, so the event is tried again (and parked if it keeps
failing); a deployment without Stripe has no subscription to cancel, and says so in its log.
"""

from __future__ import annotations

import logging
from typing import Any

from contracts import (
    CustomerClosed,
    PaymentFailed,
    SubscriptionActivated,
    SubscriptionCanceled,
    SubscriptionChanged,
)
from libs.db.postgres import Connection
from libs.projections.apply import Projection, Recorded
from services.billing.decisions import BILLING_STATES
from services.billing.stripe_api import StripeGateway, StripeNotConfigured

log = logging.getLogger(__name__)

_SEEN = """
    INSERT INTO closed_subscriptions (customer_id, stripe_subscription_id, status)
    VALUES ($1, $2, $3)
    ON CONFLICT (customer_id) DO UPDATE SET
        stripe_subscription_id = COALESCE(EXCLUDED.stripe_subscription_id,
                                          closed_subscriptions.stripe_subscription_id),
        status = EXCLUDED.status
    RETURNING stripe_subscription_id, status, closed_at
"""


class ClosedSubscriptions:
    """The reactor's handlers, with the Stripe gateway they cancel through."""

    def __init__(self, gateway: StripeGateway) -> None:
        """``gateway``: billing's Stripe calls."""
        self._gateway = gateway

    async def when_customer_closed(self, conn: Connection, r: Recorded[CustomerClosed]) -> None:
        """The account closed: cancel its subscription if it still bills (on the first
        closure only; closing again asks nothing more of Stripe)."""
        customer_id = r.event.customer_id
        if await conn.fetchval(
            "SELECT closed_at FROM closed_subscriptions WHERE customer_id = $1", customer_id
        ):
            return
        row = await conn.fetchrow(
            "INSERT INTO closed_subscriptions (customer_id, closed_at) VALUES ($1, $2) "
            "ON CONFLICT (customer_id) DO UPDATE SET closed_at = EXCLUDED.closed_at "
            "RETURNING stripe_subscription_id, status, closed_at",
            customer_id,
            r.envelope.occurred_at,
        )
        await self._cancel_if_billing(customer_id, row)

    async def when_subscription_moved(
        self,
        conn: Connection,
        r: Recorded[SubscriptionActivated] | Recorded[SubscriptionChanged],
    ) -> None:
        """A subscription started or changed: cancel it if the account is closed."""
        e = r.event
        row = await conn.fetchrow(_SEEN, e.customer_id, e.stripe_subscription_id, e.status)
        await self._cancel_if_billing(e.customer_id, row)

    async def when_subscription_ended_or_late(
        self, conn: Connection, r: Recorded[SubscriptionCanceled] | Recorded[PaymentFailed]
    ) -> None:
        """Remember where the subscription stands; nothing to cancel on these."""
        status = "canceled" if isinstance(r.event, SubscriptionCanceled) else "past_due"
        await conn.execute(_SEEN, r.event.customer_id, None, status)

    async def _cancel_if_billing(self, customer_id: str, row: Any) -> None:
        subscription = row["stripe_subscription_id"]
        if row["closed_at"] is None or not subscription or row["status"] not in BILLING_STATES:
            return
        try:
            canceled = await self._gateway.cancel_subscription(subscription)
        except StripeNotConfigured:
            log.warning(
                "closed account %s: subscription %s not canceled, Stripe is not configured",
                customer_id,
                subscription,
            )
            return
        log.info(
            "closed account %s: subscription %s %s at Stripe",
            customer_id,
            subscription,
            "canceled" if canceled else "already ended",
        )


def closed_subscriptions_reactor(gateway: StripeGateway) -> Projection:
    """The reactor that cancels a closed account's subscription at Stripe."""
    handlers = ClosedSubscriptions(gateway)
    return Projection(
        name="cancel_closed_subscriptions",
        tables=(),
        handlers={
            CustomerClosed: handlers.when_customer_closed,
            SubscriptionActivated: handlers.when_subscription_moved,
            SubscriptionChanged: handlers.when_subscription_moved,
            SubscriptionCanceled: handlers.when_subscription_ended_or_late,
            PaymentFailed: handlers.when_subscription_ended_or_late,
        },
    )
