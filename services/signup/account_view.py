"""The account view: what ``GET /api/customers/me`` and a signup's answer show of a customer.

Built from the ``accounts`` read model, which signup projects from every event about the
customer (billing's trial, licensing's license, the provisioner's deployment), and from the
invoices and latest usage day (``account_invoices``, ``account_usage``). Each part shows
"pending" until the service that owns it has answered.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import msgspec

from contracts import Features
from libs.http.errors import NotFound
from libs.timeutil import days_remaining
from services.signup.models import (
    AccountView,
    CustomerOut,
    DeploymentOut,
    InvoiceOut,
    LicenseOut,
    SubscriptionOut,
    UsageOut,
)

ACCOUNT_URL = "/api/customers/me"
ESTIMATED_DEPLOY_TIME = "a few seconds"
WAITING_FOR_CAPACITY = "waiting_for_capacity"
WAITING_FOR_CAPACITY_DETAIL = (
    "The platform is running all the instances it can hold right now. Yours is queued and "
    "starts by itself as soon as a slot frees; your account and trial are ready meanwhile."
)
# Deployment states of a job not started yet (or of no job yet).
NOT_UNDER_WAY = ("pending", "queued")
# Two years of monthly invoices; older ones are at Stripe's portal.
ACCOUNT_INVOICES = 24


def subscription_of(row: asyncpg.Record | None, now: datetime) -> SubscriptionOut:
    """The subscription part of the account view (pending until billing has answered)."""
    if row is None or row["subscription_status"] == "pending":
        return SubscriptionOut(
            plan="starter", status="pending", trial_ends_at=None, trial_days_remaining=None
        )
    ends = row["trial_ends_at"]
    remaining = None
    if ends is not None and row["subscription_status"] == "trialing":
        remaining = days_remaining(ends, now)
    return SubscriptionOut(
        plan=row["plan"],
        status=row["subscription_status"],
        trial_ends_at=ends,
        trial_days_remaining=remaining,
    )


def license_of(row: asyncpg.Record | None) -> LicenseOut:
    """The current license (pending until licensing has issued one)."""
    if row is None or row["license_jwt"] is None:
        return LicenseOut(status="pending", jwt=None, expires_at=None, features=None)
    features = msgspec.json.decode(row["license_features"], type=Features)
    return LicenseOut(
        status="active",
        jwt=row["license_jwt"],
        expires_at=row["license_expires_at"],
        features=features,
        plan=row["license_plan"],
    )


def deployment_of(row: asyncpg.Record | None, platform_full: bool = False) -> DeploymentOut:
    """The instance's deployment (pending until the provisioner has taken it up). With
    ``platform_full``, one not under way yet is shown waiting for capacity: the provisioner
    will hold it until an instance's slot frees."""
    status = "pending" if row is None else row["deployment_status"]
    if platform_full and status in NOT_UNDER_WAY:
        status = WAITING_FOR_CAPACITY
    waiting = status == WAITING_FOR_CAPACITY
    if row is None:
        return DeploymentOut(
            status=status,
            job_id=None,
            instance_url=None,
            estimated_time=None if waiting else ESTIMATED_DEPLOY_TIME,
            check_status_url=ACCOUNT_URL,
            detail=WAITING_FOR_CAPACITY_DETAIL if waiting else None,
        )
    ready = status == "ready"
    return DeploymentOut(
        status=status,
        job_id=row["deployment_job_id"],
        instance_url=row["instance_url"],
        estimated_time=None if ready or waiting else ESTIMATED_DEPLOY_TIME,
        check_status_url=ACCOUNT_URL,
        progress=row["deployment_progress"],
        step=row["deployment_step"],
        error=row["deployment_error"],
        detail=WAITING_FOR_CAPACITY_DETAIL if waiting else None,
        degraded_since=row["instance_degraded_since"],
        health_reason=row["instance_health_reason"],
    )


async def invoices_of(pool: asyncpg.Pool, customer_id: str) -> list[InvoiceOut]:
    """The customer's invoices, newest first, at most ``ACCOUNT_INVOICES``."""
    rows = await pool.fetch(
        "SELECT number, status, amount, currency, created_at, url FROM account_invoices "
        "WHERE customer_id = $1 ORDER BY created_at DESC, stripe_invoice_id DESC LIMIT $2",
        customer_id,
        ACCOUNT_INVOICES,
    )
    return [InvoiceOut(**dict(row)) for row in rows]


def _limit(document: str | None, name: str) -> int | None:
    """One value of a license's features or limits as projected (JSON), if it is there."""
    if document is None:
        return None
    value = msgspec.json.decode(document).get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def usage_of(pool: asyncpg.Pool, account: asyncpg.Record) -> UsageOut | None:
    """The newest day the instance reported, against the license in force (None before the
    first report)."""
    row = await pool.fetchrow(
        "SELECT day, devices, messages, api_requests FROM account_usage WHERE customer_id = $1",
        account["customer_id"],
    )
    if row is None:
        return None
    return UsageOut(
        day=row["day"],
        devices=row["devices"],
        messages=row["messages"],
        api_requests=row["api_requests"],
        max_devices=_limit(account["license_features"], "maxDevices"),
        messages_per_day=_limit(account["license_limits"], "mqttMessagesPerDay"),
        api_requests_per_day=_limit(account["license_limits"], "apiRequestsPerDay"),
    )


async def platform_full(pool: asyncpg.Pool) -> bool:
    """Whether the provisioner last said the platform runs all the instances it can hold."""
    return bool(await pool.fetchval('SELECT "full" FROM platform_capacity'))


async def account_view(pool: asyncpg.Pool, customer_id: str) -> AccountView:
    """The customer's account view, projected from every event about them."""
    row = await pool.fetchrow("SELECT * FROM accounts WHERE customer_id = $1", customer_id)
    if row is None:
        raise NotFound("no such account")
    now = datetime.now(UTC)
    return AccountView(
        customer=CustomerOut(
            customer_id=row["customer_id"], email=row["email"], company_name=row["company_name"]
        ),
        full_name=row["full_name"],
        signed_up_at=row["signed_up_at"],
        subscription=subscription_of(row, now),
        license=license_of(row),
        deployment=deployment_of(row),
        closed_at=row["closed_at"],
        invoices=await invoices_of(pool, customer_id),
        usage=await usage_of(pool, row),
        email_verified=row["email_verified"],
    )
