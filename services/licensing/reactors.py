"""What licensing does when other services' events arrive: issue the license that follows.

A trial license at signup; a subscription license (30 days) when billing activates or changes a
subscription; a license with a grace period when a payment fails; a final, expired license
when the subscription is canceled or the trial runs out; none once the account is closed, when
its current license is revoked instead (``closing.py``). Every license's times come from the
event that caused it, so issuing it again after a crash yields the very same token and event.

Each handler is a function of its own that takes the signer it signs with, the consumer's
connection and the recorded event, so a test can run one alone; ``licensing_reactors`` binds
them to the signer in the table that says what licensing reacts to.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import partial
from typing import Any

from contracts import (
    CustomerClosed,
    CustomerSignedUp,
    LicenseIssued,
    PaymentFailed,
    SubscriptionActivated,
    SubscriptionCanceled,
    SubscriptionChanged,
    TrialExpired,
)
from libs.db.postgres import Connection
from libs.eventlog.store import caused_event_id
from libs.projections.apply import Projection, Recorded
from libs.runtime.outbox import add_to_outbox, outbox_relay
from libs.runtime.service import ServiceRuntime
from services.licensing.closing import (
    is_closed,
    when_customer_closed_revoke_license,
    when_license_issued_track_it,
)
from services.licensing.issuing import (
    GRACE_DAYS,
    SUBSCRIPTION_LICENSE_DAYS,
    LicenseSigner,
    signed_license,
)


async def issue_license(
    signer: LicenseSigner,
    conn: Connection,
    r: Recorded[Any],
    *,
    plan_name: str,
    license_type: str,
    expires_at: datetime,
    grace_until: datetime | None,
    reason: str,
) -> None:
    """Sign the license that answers ``r`` and put its LicenseIssued into the outbox; none
    for a closed account (``closing.py``)."""
    customer_id = r.envelope.customer_id
    if customer_id is None:
        raise ValueError(f"{r.envelope.type} without a customer id")
    if await is_closed(conn, customer_id):
        return
    license_id = caused_event_id(r.envelope, "license")
    # Into the outbox, in this consumer's transaction: the license reaches the log once,
    # however long after its cause this event is delivered again.
    await add_to_outbox(
        conn,
        signed_license(
            signer,
            customer_id=customer_id,
            license_id=license_id,
            plan_name=plan_name,
            license_type=license_type,
            issued_at=r.envelope.occurred_at,
            expires_at=expires_at,
            grace_until=grace_until,
            reason=reason,
        ),
        customer_id=customer_id,
        causation=r.envelope,
        event_id=caused_event_id(r.envelope, "license-issued"),
    )


async def _current_plan(conn: Connection, customer_id: str) -> str:
    value = await conn.fetchval(
        "SELECT plan FROM license_plans WHERE customer_id = $1", customer_id
    )
    return str(value) if value else "starter"


async def _remember_plan(conn: Connection, customer_id: str, plan_name: str, status: str) -> None:
    await conn.execute(
        "INSERT INTO license_plans (customer_id, plan, subscription_status) "
        "VALUES ($1, $2, $3) ON CONFLICT (customer_id) DO UPDATE "
        "SET plan = EXCLUDED.plan, subscription_status = EXCLUDED.subscription_status",
        customer_id,
        plan_name,
        status,
    )


async def _remember_status(conn: Connection, customer_id: str, status: str) -> None:
    await conn.execute(
        "UPDATE license_plans SET subscription_status = $2 WHERE customer_id = $1",
        customer_id,
        status,
    )


async def when_customer_signed_up_issue_trial_license(
    signer: LicenseSigner, conn: Connection, r: Recorded[CustomerSignedUp]
) -> None:
    """A trial license on the signup's plan, for the signup's trial days."""
    e = r.event
    await _remember_plan(conn, e.customer_id, e.plan, "trialing")
    # The trial license is timed by the signup itself, so it ends with billing's trial.
    await issue_license(
        signer,
        conn,
        r,
        plan_name=e.plan,
        license_type="trial_signup",
        expires_at=e.signed_up_at + timedelta(days=e.trial_days),
        grace_until=None,
        reason=f"{e.trial_days}-day trial at signup",
    )


async def when_subscription_active_issue_subscription_license(
    signer: LicenseSigner,
    conn: Connection,
    r: Recorded[SubscriptionActivated] | Recorded[SubscriptionChanged],
) -> None:
    """A 30-day license on the subscription's plan while it is active or trialing."""
    e = r.event
    await _remember_plan(conn, e.customer_id, e.plan, e.status)
    if e.status not in ("active", "trialing"):
        return  # past due is answered by PaymentFailed, the end by SubscriptionCanceled
    await issue_license(
        signer,
        conn,
        r,
        plan_name=e.plan,
        license_type="subscription",
        expires_at=r.envelope.occurred_at + timedelta(days=SUBSCRIPTION_LICENSE_DAYS),
        grace_until=None,
        reason=f"subscription {e.status} on {e.plan}",
    )


async def when_payment_failed_issue_grace_license(
    signer: LicenseSigner, conn: Connection, r: Recorded[PaymentFailed]
) -> None:
    """A license that lasts the grace period, on the plan the customer had."""
    await _remember_status(conn, r.event.customer_id, "past_due")
    grace = r.envelope.occurred_at + timedelta(days=GRACE_DAYS)
    await issue_license(
        signer,
        conn,
        r,
        plan_name=await _current_plan(conn, r.event.customer_id),
        license_type="grace",
        expires_at=grace,
        grace_until=grace,
        reason=f"payment failed (attempt {r.event.attempt_count}); {GRACE_DAYS} days grace",
    )


async def when_subscription_ends_issue_final_license(
    signer: LicenseSigner,
    conn: Connection,
    r: Recorded[SubscriptionCanceled] | Recorded[TrialExpired],
) -> None:
    """A final license, expired the moment it is issued: the instance goes read-only."""
    canceled = isinstance(r.event, SubscriptionCanceled)
    await _remember_status(conn, r.event.customer_id, "canceled" if canceled else "expired")
    await issue_license(
        signer,
        conn,
        r,
        plan_name=await _current_plan(conn, r.event.customer_id),
        license_type="final",
        expires_at=r.envelope.occurred_at,
        grace_until=None,
        reason="subscription canceled" if canceled else "trial ended unpaid",
    )


def licensing_reactors(runtime: ServiceRuntime, signer: LicenseSigner) -> list[Projection]:
    """The license that follows each signup and each change of the subscription, and the
    revocation that follows a closure."""
    relay = outbox_relay(runtime)
    return [
        Projection(
            name="issue_licenses",
            tables=(),
            handlers={
                CustomerSignedUp: partial(when_customer_signed_up_issue_trial_license, signer),
                SubscriptionActivated: partial(
                    when_subscription_active_issue_subscription_license, signer
                ),
                SubscriptionChanged: partial(
                    when_subscription_active_issue_subscription_license, signer
                ),
                PaymentFailed: partial(when_payment_failed_issue_grace_license, signer),
                SubscriptionCanceled: partial(when_subscription_ends_issue_final_license, signer),
                TrialExpired: partial(when_subscription_ends_issue_final_license, signer),
                CustomerClosed: when_customer_closed_revoke_license,
                LicenseIssued: when_license_issued_track_it,
            },
            after_commit=relay.wake,
        )
    ]
