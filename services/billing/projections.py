"""Subscriptions as the billing events describe them."""

from __future__ import annotations

from typing import Any

from contracts import (
    CustomerErased,
    CustomerSignedUp,
    PaymentFailed,
    PersonalData,
    StripeCustomerLinked,
    SubscriptionActivated,
    SubscriptionCanceled,
    SubscriptionChanged,
    TrialExpired,
    TrialStarted,
)
from libs.db.postgres import Connection
from libs.eventlog.decisions import cause_json
from libs.projections.apply import Projection, Recorded, update_customer_row
from libs.sealing.vault import personal_data_of


async def when_customer_signed_up_record_contact(
    conn: Connection, r: Recorded[CustomerSignedUp]
) -> None:
    e = r.event
    # Erased already (a replay after the erasure): billed, if ever, without a name.
    personal = await personal_data_of(conn, e.customer_id, e) or PersonalData()
    await conn.execute(
        "INSERT INTO billing_customers (customer_id, email, company_name) VALUES ($1, $2, $3) "
        "ON CONFLICT (customer_id) DO NOTHING",
        e.customer_id,
        personal.email_display,
        personal.company_name,
    )


async def when_customer_erased_drop_contact(conn: Connection, r: Recorded[CustomerErased]) -> None:
    e = r.event
    await conn.execute(
        "UPDATE billing_customers SET email = NULL, company_name = NULL, erased_at = $2 "
        "WHERE customer_id = $1",
        e.customer_id,
        e.erased_at,
    )
    # Stripe's webhook bodies as sent (private state kept for a retention period, never
    # replayed) hold the customer's name and email too: those naming them go now.
    await conn.execute(
        "DELETE FROM stripe_payloads WHERE position(convert_to($1, 'UTF8') IN payload) > 0 "
        "OR position(convert_to(coalesce((SELECT stripe_customer_id FROM billing_customers "
        "WHERE customer_id = $1), $1), 'UTF8') IN payload) > 0",
        e.customer_id,
    )


async def when_stripe_customer_linked_record_mapping(
    conn: Connection, r: Recorded[StripeCustomerLinked]
) -> None:
    e = r.event
    # The first link wins: a customer has one Stripe customer for life.
    await conn.execute(
        "UPDATE billing_customers SET stripe_customer_id = $2, linked_at = $3 "
        "WHERE customer_id = $1 AND stripe_customer_id IS NULL",
        e.customer_id,
        e.stripe_customer_id,
        r.envelope.occurred_at,
    )
    await _update(
        conn, r, "stripe_customer_id = COALESCE(stripe_customer_id, $3)", e.stripe_customer_id
    )


async def when_trial_started_record_trial(conn: Connection, r: Recorded[TrialStarted]) -> None:
    e = r.event
    await conn.execute(
        """
        INSERT INTO subscriptions (customer_id, plan, status, trial_started_at, trial_ends_at,
                                   updated_at, trial_cause)
        VALUES ($1, $2, 'trialing', $3, $4, $5, $6::jsonb)
        ON CONFLICT (customer_id) DO NOTHING
        """,
        e.customer_id,
        e.plan,
        e.trial_started_at,
        e.trial_ends_at,
        r.envelope.occurred_at,
        # What the trial's expiry will be decided on (trials.py).
        cause_json(r.envelope),
    )


async def _update(conn: Connection, r: Recorded[Any], sets: str, *args: object) -> None:
    await update_customer_row(conn, "subscriptions", r, sets, *args)


async def when_trial_expired_record_expiry(conn: Connection, r: Recorded[TrialExpired]) -> None:
    await _update(conn, r, "status = 'expired'")


async def when_subscription_activated_record_it(
    conn: Connection, r: Recorded[SubscriptionActivated]
) -> None:
    e = r.event
    await conn.execute(
        """
        INSERT INTO subscriptions (customer_id, plan, status, stripe_customer_id,
                                   stripe_subscription_id, current_period_end, updated_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        ON CONFLICT (customer_id) DO UPDATE SET
            plan = EXCLUDED.plan, status = EXCLUDED.status,
            stripe_customer_id = EXCLUDED.stripe_customer_id,
            stripe_subscription_id = EXCLUDED.stripe_subscription_id,
            current_period_end = EXCLUDED.current_period_end, canceled_at = NULL,
            updated_at = EXCLUDED.updated_at
        """,
        e.customer_id,
        e.plan,
        e.status,
        e.stripe_customer_id,
        e.stripe_subscription_id,
        e.current_period_end,
        r.envelope.occurred_at,
    )


async def when_subscription_changed_record_it(
    conn: Connection, r: Recorded[SubscriptionChanged]
) -> None:
    e = r.event
    await _update(
        conn,
        r,
        "plan = $3, status = $4, current_period_end = $5",
        e.plan,
        e.status,
        e.current_period_end,
    )


async def when_payment_failed_record_it(conn: Connection, r: Recorded[PaymentFailed]) -> None:
    await _update(conn, r, "status = 'past_due', last_payment_failure_at = $2")


async def when_subscription_canceled_record_it(
    conn: Connection, r: Recorded[SubscriptionCanceled]
) -> None:
    await _update(conn, r, "status = 'canceled', canceled_at = $3", r.event.canceled_at)


SUBSCRIPTIONS = Projection(
    name="subscriptions",
    tables=("subscriptions", "billing_customers"),
    handlers={
        CustomerSignedUp: when_customer_signed_up_record_contact,
        CustomerErased: when_customer_erased_drop_contact,
        StripeCustomerLinked: when_stripe_customer_linked_record_mapping,
        TrialStarted: when_trial_started_record_trial,
        TrialExpired: when_trial_expired_record_expiry,
        SubscriptionActivated: when_subscription_activated_record_it,
        SubscriptionChanged: when_subscription_changed_record_it,
        PaymentFailed: when_payment_failed_record_it,
        SubscriptionCanceled: when_subscription_canceled_record_it,
    },
)
