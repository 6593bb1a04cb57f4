"""Billing's checkout and portal rules, alone: no database, no Stripe, no log."""

from __future__ import annotations

import pytest

from services.billing.decisions import (
    BILLING_STATES,
    OpenPortal,
    Refused,
    StartCheckout,
    SubscriptionState,
    decide_checkout,
    decide_portal,
)

TRIAL = SubscriptionState(
    plan="starter", status="trialing", stripe_subscription_id=None, stripe_customer_id=None
)


def subscribed(status: str, stripe_customer_id: str | None = "cus_1") -> SubscriptionState:
    return SubscriptionState(
        plan="professional",
        status=status,
        stripe_subscription_id="sub_1",
        stripe_customer_id=stripe_customer_id,
    )


def test_a_trial_without_a_stripe_customer_checks_out_for_a_new_one() -> None:
    assert decide_checkout(TRIAL, "enterprise") == StartCheckout(
        plan="enterprise", stripe_customer_id=None
    )


def test_a_linked_stripe_customer_is_reused() -> None:
    linked = SubscriptionState(
        plan="starter", status="trialing", stripe_subscription_id=None, stripe_customer_id="cus_9"
    )
    assert decide_checkout(linked, "starter") == StartCheckout(
        plan="starter", stripe_customer_id="cus_9"
    )


@pytest.mark.parametrize("status", BILLING_STATES)
def test_a_subscription_that_still_bills_refuses_a_second_checkout(status: str) -> None:
    decision = decide_checkout(subscribed(status), "enterprise")
    assert isinstance(decision, Refused)
    assert f"already subscribed to professional ({status})" in decision.reason
    assert "billing portal" in decision.reason


@pytest.mark.parametrize("status", ["canceled", "incomplete_expired", "expired"])
def test_a_subscription_that_no_longer_bills_may_check_out_again(status: str) -> None:
    assert decide_checkout(subscribed(status), "starter") == StartCheckout(
        plan="starter", stripe_customer_id="cus_1"
    )


def test_a_billing_status_without_a_stripe_subscription_is_a_trial() -> None:
    # Trialing on billing's own trial (no subscription at Stripe yet) is what checkout is for.
    assert isinstance(decide_checkout(TRIAL, "starter"), StartCheckout)


def test_the_portal_needs_a_stripe_customer() -> None:
    refused = decide_portal(TRIAL)
    assert isinstance(refused, Refused)
    assert "checkout" in refused.reason
    assert decide_portal(subscribed("active")) == OpenPortal("cus_1")
