"""A customer's billing account: what checkout, the billing portal and the subscription view do.

Each command reads the account from billing's read model, asks ``decisions.py`` what to do, and
does it: Stripe calls through ``StripeGateway``, and one append, ``StripeCustomerLinked``, when
a first checkout makes the customer's Stripe customer.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from contracts import StripeCustomerLinked
from libs.eventlog.store import EventStore
from libs.http.errors import Conflict, NotFound
from libs.timeutil import days_remaining
from services.billing.decisions import (
    Refused,
    SubscriptionState,
    decide_checkout,
    decide_portal,
)
from services.billing.stripe_api import StripeGateway

_ACCOUNT = """
    SELECT c.customer_id, c.email, c.company_name, c.stripe_customer_id AS linked_customer,
           s.plan, s.status, s.trial_started_at, s.trial_ends_at, s.stripe_customer_id,
           s.stripe_subscription_id, s.current_period_end, s.last_payment_failure_at,
           s.canceled_at, s.updated_at, a.closed_at
    FROM billing_customers c LEFT JOIN subscriptions s USING (customer_id)
    LEFT JOIN account_access a USING (customer_id)
    WHERE c.customer_id = $1
"""


def subscription_state(row: asyncpg.Record) -> SubscriptionState:
    """What the rules need of an account row."""
    return SubscriptionState(
        plan=row["plan"],
        status=row["status"],
        stripe_subscription_id=row["stripe_subscription_id"],
        stripe_customer_id=row["linked_customer"] or row["stripe_customer_id"],
        closed=row["closed_at"] is not None,
    )


class AccountClosed(Conflict):
    """409: the account is closed; checkout and the billing portal are not for it."""

    code = "account_closed"


def refusal(decision: Refused) -> Conflict:
    """The 409 a refused command answers (``account_closed`` for a closed account)."""
    return AccountClosed(decision.reason) if decision.closed else Conflict(decision.reason)


@dataclass(frozen=True)
class BillingAccounts:
    """The customer-facing billing commands, over billing's pool, the log and Stripe."""

    pool: asyncpg.Pool
    store: EventStore
    gateway: StripeGateway

    async def account(self, customer_id: str) -> asyncpg.Record:
        """The customer's billing account row; 404 until billing has projected it."""
        row = await self.pool.fetchrow(_ACCOUNT, customer_id)
        if row is None:
            # A valid token for an account billing has not projected yet (a second after
            # signup), or one that is gone: try again shortly either way.
            raise NotFound("no billing account for this customer yet; try again shortly")
        return row

    async def checkout(self, customer_id: str, plan: str, attempt: str) -> dict[str, Any]:
        """A Stripe Checkout page where the customer subscribes to ``plan``; ``attempt`` is
        the client's idempotency key (a retry gets the same session)."""
        row = await self.account(customer_id)
        decision = decide_checkout(subscription_state(row), plan)
        if isinstance(decision, Refused):
            raise refusal(decision)
        session = await self.gateway.create_checkout(
            customer_id=customer_id,
            stripe_customer_id=decision.stripe_customer_id or await self._link_new_customer(row),
            plan=decision.plan,
            attempt=attempt,
        )
        return {
            "checkout_url": session.url,
            "session_id": session.id,
            "plan": decision.plan,
            "expires_at": _iso(session.expires_at),
        }

    async def _link_new_customer(self, row: asyncpg.Record) -> str:
        """Make the customer's Stripe customer and append ``StripeCustomerLinked``."""
        # Concurrent first checkouts get the same Stripe customer (idempotency key), and
        # the link event's id is derived from the pair, so it is recorded once.
        customer_id = row["customer_id"]
        created = await self.gateway.create_customer(customer_id, row["email"], row["company_name"])
        await self.store.publish(
            StripeCustomerLinked(
                customer_id=customer_id, stripe_customer_id=created, linked_via="checkout"
            ),
            customer_id=customer_id,
            event_id=str(
                uuid.uuid5(uuid.NAMESPACE_URL, f"stripe-customer:{customer_id}:{created}")
            ),
        )
        return created

    async def portal(self, customer_id: str) -> dict[str, Any]:
        """A Stripe billing-portal page: change plan or card, see invoices, cancel."""
        decision = decide_portal(subscription_state(await self.account(customer_id)))
        if isinstance(decision, Refused):
            raise refusal(decision)
        return {"portal_url": await self.gateway.create_portal(decision.stripe_customer_id)}

    async def subscription(self, customer_id: str, now: datetime) -> dict[str, Any]:
        """The customer's subscription as billing knows it; 404 until it has one."""
        row = await self.account(customer_id)
        if row["status"] is None:
            raise NotFound("no subscription for this customer yet; try again shortly")
        trial_ends = row["trial_ends_at"]
        return {
            "customer_id": row["customer_id"],
            "plan": row["plan"],
            "status": row["status"],
            "trial_ends_at": trial_ends,
            "trial_days_remaining": days_remaining(trial_ends, now)
            if trial_ends and row["status"] == "trialing"
            else None,
            "current_period_end": row["current_period_end"],
            "last_payment_failure_at": row["last_payment_failure_at"],
            "canceled_at": row["canceled_at"],
            "stripe_customer_id": row["linked_customer"] or row["stripe_customer_id"],
            "stripe_subscription_id": row["stripe_subscription_id"],
            "updated_at": row["updated_at"],
        }


def _iso(timestamp: int | None) -> str | None:
    return datetime.fromtimestamp(timestamp, UTC).isoformat() if timestamp else None
