"""The account view: one row per customer, kept from every event about them (its invoices and
latest usage are ``account_billing.py``'s); and the platform's room for instances, which a new
trial is told about."""

from __future__ import annotations

from typing import Any

import msgspec

from contracts import (
    CredentialsChanged,
    CustomerClosed,
    CustomerErased,
    CustomerSignedUp,
    DeploymentFailed,
    DeploymentProgressed,
    DeploymentRequested,
    DeploymentStarted,
    DeploymentSucceeded,
    DeploymentWaitingForCapacity,
    EmailVerified,
    InstanceCapacityChanged,
    InstanceDegraded,
    InstanceRecovered,
    LicenseIssued,
    LicenseRevoked,
    PaymentFailed,
    PersonalData,
    SubscriptionActivated,
    SubscriptionCanceled,
    SubscriptionChanged,
    TrialExpired,
    TrialStarted,
)
from libs.db.postgres import Connection
from libs.projections.apply import Projection, Recorded, update_customer_row
from libs.sealing.vault import destroy_data_key, personal_data_of


async def when_customer_signed_up_open_account(
    conn: Connection, r: Recorded[CustomerSignedUp]
) -> None:
    e = r.event
    # Erased already (a replay after the erasure): the account is there, without a name.
    personal = await personal_data_of(conn, e.customer_id, e) or PersonalData()
    await conn.execute(
        """
        INSERT INTO accounts (customer_id, email, email_display, company_name, full_name,
                              signed_up_at, plan, updated_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        ON CONFLICT (customer_id) DO NOTHING
        """,
        e.customer_id,
        personal.email,
        personal.email_display,
        personal.company_name,
        personal.full_name,
        e.signed_up_at,
        e.plan,
        r.envelope.occurred_at,
    )


async def _update(conn: Connection, r: Recorded[Any], sets: str, *args: object) -> None:
    await update_customer_row(conn, "accounts", r, sets, *args)


async def when_customer_closed_close_account(conn: Connection, r: Recorded[CustomerClosed]) -> None:
    await _update(conn, r, "closed_at = $2, subscription_status = 'closed'")


async def when_email_verified_show_it(conn: Connection, r: Recorded[EmailVerified]) -> None:
    personal = await personal_data_of(conn, r.event.customer_id, r.event)
    if personal is None:
        return  # erased: no address to verify (CustomerErased clears the flag as well)
    # Only the address the account has (a later change of address would need verifying anew).
    await conn.execute(
        "UPDATE accounts SET email_verified = true, updated_at = $2 "
        "WHERE customer_id = $1 AND email = $3",
        r.envelope.customer_id,
        r.envelope.occurred_at,
        personal.email,
    )


async def when_customer_erased_drop_personal_data(
    conn: Connection, r: Recorded[CustomerErased]
) -> None:
    # The key follows the log: a vault restored from a backup older than the erasure gets
    # the key destroyed again when this is applied again (a replay, or a restored checkpoint).
    await destroy_data_key(conn, r.event.customer_id)
    # The same row whether the personal data was projected before (live) or could not be
    # opened any more (a replay): nothing in it depends on what the sealed data said.
    await _update(
        conn,
        r,
        "email = NULL, email_display = NULL, company_name = NULL, full_name = NULL, "
        "email_verified = false, erased_at = $3",
        r.event.erased_at,
    )


async def when_credentials_changed_show_it(
    conn: Connection, r: Recorded[CredentialsChanged]
) -> None:
    await _update(conn, r, "password_changed_at = $3", r.event.changed_at)


async def when_trial_started_show_trial(conn: Connection, r: Recorded[TrialStarted]) -> None:
    await _update(
        conn,
        r,
        "plan = $3, subscription_status = 'trialing', trial_ends_at = $4",
        r.event.plan,
        r.event.trial_ends_at,
    )


async def when_trial_expired_show_expiry(conn: Connection, r: Recorded[TrialExpired]) -> None:
    await _update(conn, r, "subscription_status = 'expired'")


async def when_subscription_activated_show_plan(
    conn: Connection, r: Recorded[SubscriptionActivated]
) -> None:
    await _update(
        conn,
        r,
        "plan = $3, subscription_status = $4, current_period_end = $5",
        r.event.plan,
        r.event.status,
        r.event.current_period_end,
    )


async def when_subscription_changed_show_plan(
    conn: Connection, r: Recorded[SubscriptionChanged]
) -> None:
    await _update(
        conn,
        r,
        "plan = $3, subscription_status = $4, current_period_end = $5",
        r.event.plan,
        r.event.status,
        r.event.current_period_end,
    )


async def when_payment_failed_show_past_due(conn: Connection, r: Recorded[PaymentFailed]) -> None:
    await _update(conn, r, "subscription_status = 'past_due'")


async def when_subscription_canceled_show_canceled(
    conn: Connection, r: Recorded[SubscriptionCanceled]
) -> None:
    await _update(conn, r, "subscription_status = 'canceled'")


async def when_license_issued_show_license(conn: Connection, r: Recorded[LicenseIssued]) -> None:
    e = r.event
    await _update(
        conn,
        r,
        "license_id = $3, license_jwt = $4, license_plan = $5, license_expires_at = $6, "
        "license_features = $7::jsonb, license_limits = $8::jsonb",
        e.license_id,
        e.jwt,
        e.plan,
        e.expires_at,
        msgspec.json.encode(e.features).decode(),
        msgspec.json.encode(e.limits).decode(),
    )


async def when_license_revoked_clear_license(conn: Connection, r: Recorded[LicenseRevoked]) -> None:
    # Only the license in force is cleared; revoking an older one changes nothing shown.
    await conn.execute(
        "UPDATE accounts SET license_id = NULL, license_jwt = NULL, license_plan = NULL, "
        "license_expires_at = NULL, license_features = NULL, license_limits = NULL, "
        "updated_at = $2 "
        "WHERE customer_id = $1 AND license_id = $3",
        r.envelope.customer_id,
        r.envelope.occurred_at,
        r.event.license_id,
    )


# Who asks for a redeploy of an instance that stays unhealthy (the provisioner's health watch).
HEALTH_WATCH = "health-watch"
# The job in hand is the health watch's redeploy: the account shows it as recovering throughout.
_RECOVERING = "deployment_status = 'recovering' AND deployment_job_id = $3"


async def when_deployment_requested_show_pending(
    conn: Connection, r: Recorded[DeploymentRequested]
) -> None:
    status = "recovering" if r.event.requested_by == HEALTH_WATCH else "queued"
    await _update(
        conn,
        r,
        "deployment_job_id = $3, deployment_status = $4, "
        "deployment_progress = 0, deployment_step = NULL, deployment_error = NULL",
        r.event.job_id,
        status,
    )


async def when_deployment_started_show_active(
    conn: Connection, r: Recorded[DeploymentStarted]
) -> None:
    await _update(
        conn,
        r,
        f"deployment_status = CASE WHEN {_RECOVERING} THEN 'recovering' ELSE 'deploying' END, "
        "deployment_job_id = $3",
        r.event.job_id,
    )


async def when_deployment_progressed_show_progress(
    conn: Connection, r: Recorded[DeploymentProgressed]
) -> None:
    await _update(
        conn, r, "deployment_progress = $3, deployment_step = $4", r.event.progress, r.event.step
    )


async def when_deployment_waits_for_capacity_show_it(
    conn: Connection, r: Recorded[DeploymentWaitingForCapacity]
) -> None:
    # Only while that job is still the account's latest and has not started since.
    await conn.execute(
        "UPDATE accounts SET deployment_status = 'waiting_for_capacity', updated_at = $2 "
        "WHERE customer_id = $1 AND deployment_job_id = $3 "
        "AND deployment_status IN ('queued', 'retrying', 'failed')",
        r.envelope.customer_id,
        r.envelope.occurred_at,
        r.event.job_id,
    )


async def when_deployment_succeeded_show_instance(
    conn: Connection, r: Recorded[DeploymentSucceeded]
) -> None:
    # A finished delete job reports its instance as removed: the account has none any more.
    removed = r.event.components.get("instance") == "removed"
    # It answered ready to finish: whatever the health watch said before is over.
    await _update(
        conn,
        r,
        "deployment_status = $4, deployment_progress = 100, "
        "deployment_error = NULL, instance_url = $3, "
        "instance_degraded_since = NULL, instance_health_reason = NULL",
        r.event.instance_url,
        "removed" if removed else "ready",
    )


async def when_deployment_failed_show_error(
    conn: Connection, r: Recorded[DeploymentFailed]
) -> None:
    # A recovering redeploy that will try again is still recovering.
    await _update(
        conn,
        r,
        f"deployment_status = CASE WHEN NOT $4 THEN 'failed' WHEN {_RECOVERING} "
        "THEN 'recovering' ELSE 'retrying' END, deployment_error = $5",
        r.event.job_id,
        r.event.will_retry,
        r.event.error,
    )


# While a job is in hand (or the instance is gone), that is what the account shows; the health
# watch decides nothing while a job of the customer waits or runs.
_JOB_IN_HAND = (
    "('queued', 'deploying', 'retrying', 'recovering', 'removed', 'waiting_for_capacity')"
)


async def when_instance_degraded_show_degraded(
    conn: Connection, r: Recorded[InstanceDegraded]
) -> None:
    await _update(
        conn,
        r,
        f"deployment_status = CASE WHEN deployment_status IN {_JOB_IN_HAND} "
        "THEN deployment_status ELSE 'degraded' END, "
        "instance_degraded_since = $3, instance_health_reason = $4",
        r.event.since,
        r.event.reason,
    )


async def when_instance_recovered_show_ready(
    conn: Connection, r: Recorded[InstanceRecovered]
) -> None:
    await _update(
        conn,
        r,
        # Recovered follows a degraded episode: the instance answers again, whether or not
        # the health watch's redeploy failed meanwhile.
        "deployment_status = CASE WHEN deployment_status IN ('degraded', 'failed') "
        "THEN 'ready' ELSE deployment_status END, "
        "instance_degraded_since = NULL, instance_health_reason = NULL",
    )


ACCOUNTS = Projection(
    name="accounts",
    tables=("accounts",),
    handlers={
        CustomerSignedUp: when_customer_signed_up_open_account,
        CustomerClosed: when_customer_closed_close_account,
        EmailVerified: when_email_verified_show_it,
        CustomerErased: when_customer_erased_drop_personal_data,
        CredentialsChanged: when_credentials_changed_show_it,
        TrialStarted: when_trial_started_show_trial,
        TrialExpired: when_trial_expired_show_expiry,
        SubscriptionActivated: when_subscription_activated_show_plan,
        SubscriptionChanged: when_subscription_changed_show_plan,
        PaymentFailed: when_payment_failed_show_past_due,
        SubscriptionCanceled: when_subscription_canceled_show_canceled,
        LicenseIssued: when_license_issued_show_license,
        LicenseRevoked: when_license_revoked_clear_license,
        DeploymentRequested: when_deployment_requested_show_pending,
        DeploymentStarted: when_deployment_started_show_active,
        DeploymentProgressed: when_deployment_progressed_show_progress,
        DeploymentSucceeded: when_deployment_succeeded_show_instance,
        DeploymentFailed: when_deployment_failed_show_error,
        DeploymentWaitingForCapacity: when_deployment_waits_for_capacity_show_it,
        InstanceDegraded: when_instance_degraded_show_degraded,
        InstanceRecovered: when_instance_recovered_show_ready,
    },
)


async def when_instance_capacity_changed_keep_it(
    conn: Connection, r: Recorded[InstanceCapacityChanged]
) -> None:
    e = r.event
    await conn.execute(
        """
        INSERT INTO platform_capacity (only_row, running, capacity, limited_by, "full", changed_at)
        VALUES (true, $1, $2, $3, $4, $5)
        ON CONFLICT (only_row) DO UPDATE SET running = $1, capacity = $2, limited_by = $3,
            "full" = $4, changed_at = $5
        """,
        e.running,
        e.capacity,
        e.limited_by,
        e.full,
        r.envelope.occurred_at,
    )


PLATFORM_CAPACITY = Projection(
    name="platform_capacity",
    tables=("platform_capacity",),
    handlers={InstanceCapacityChanged: when_instance_capacity_changed_keep_it},
)
