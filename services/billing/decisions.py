"""Billing's rules for a customer's own requests, decided without I/O.

Given what billing knows of the customer's subscription and what they ask for, each function
says what to do, or why not; ``accounts.py`` does the reading, the Stripe calls and the appends.
"""

from __future__ import annotations

from dataclasses import dataclass

PAID_PLANS = ("starter", "professional", "enterprise")
# A Stripe subscription in these states still bills: a second checkout would charge twice.
BILLING_STATES = ("active", "past_due", "trialing", "unpaid")


@dataclass(frozen=True)
class SubscriptionState:
    """What billing knows of a customer's subscription, as far as its rules need."""

    plan: str | None
    status: str | None
    stripe_subscription_id: str | None
    # The customer at Stripe this customer is linked to, if any yet.
    stripe_customer_id: str | None
    # The account was closed (signup's CustomerClosed): nothing more is sold or opened.
    closed: bool = False


@dataclass(frozen=True)
class StartCheckout:
    """Open a Stripe Checkout page for ``plan`` (for a new Stripe customer when None)."""

    plan: str
    stripe_customer_id: str | None


@dataclass(frozen=True)
class OpenPortal:
    """Open Stripe's billing portal for this Stripe customer."""

    stripe_customer_id: str


@dataclass(frozen=True)
class Refused:
    """Not done, and why (the customer is told; it is a 409)."""

    reason: str
    # The account is closed: refused whatever was asked (``account_closed``).
    closed: bool = False


CLOSED = Refused("this account is closed; nothing can be bought or changed for it", closed=True)


def decide_checkout(current: SubscriptionState, plan: str) -> StartCheckout | Refused:
    """A checkout for ``plan``, unless a subscription that still bills exists: that one's plan
    is changed in the billing portal, never by paying for a second; never for a closed account."""
    if current.closed:
        return CLOSED
    if current.stripe_subscription_id and current.status in BILLING_STATES:
        return Refused(
            f"already subscribed to {current.plan} ({current.status}); change the plan "
            "in the billing portal (POST /api/billing/portal)"
        )
    return StartCheckout(plan=plan, stripe_customer_id=current.stripe_customer_id)


def decide_portal(current: SubscriptionState) -> OpenPortal | Refused:
    """The billing portal of the customer's Stripe customer; there is none before a checkout,
    and none for a closed account."""
    if current.closed:
        return CLOSED
    if not current.stripe_customer_id:
        return Refused(
            "no billing account at Stripe yet: subscribe first (POST /api/billing/checkout)"
        )
    return OpenPortal(current.stripe_customer_id)
