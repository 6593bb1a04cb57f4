"""Renewal: a paid subscription's license is renewed before it lapses, on one replica at a time.

Subscription licenses last 30 days. While the subscription stays active, the scheduler issues
the next license when the current one has ``LICENSE_RENEW_BEFORE_DAYS`` left, without waiting for
Stripe's renewal webhooks, so a late or lost webhook never turns a paying customer read-only.
It keeps no state of its own: the newest license (licensing's read model) and the subscription's
state as the license reactor saw it say what is due. Each renewal is derived from the license it
renews (its id, its times, hence the very same signed token), so two passes, a restart or two
replicas append it once. Each renewal is caused by the LicenseIssued of the license it renews
(kept by the licenses read model as ``cause``): it carries that license's correlation id, and
its ``schedule LicenseIssued`` span links to that license's trace.
"""

from __future__ import annotations

import functools
import uuid
from datetime import datetime, timedelta

import asyncpg

from contracts import LicenseIssued
from libs.eventlog.decisions import Decision, append_decisions, cause_from_json
from libs.eventlog.store import EventStore
from libs.projections.runner import durable_name
from services.licensing.issuing import SUBSCRIPTION_LICENSE_DAYS, LicenseSigner, signed_license

LOCK_KEY = "licensing:renewal-scheduler"
RENEWABLE = ("subscription", "renewal")
# The consumers behind the read models the decision is taken from: the subscription's state
# (kept by the license reactor) and the licenses.
CONSUMERS = (durable_name("licensing", "issue_licenses"), durable_name("licensing", "licenses"))

# The newest license of each customer (or of customer $3) whose subscription is active and
# whose account is open (a closed account's license is revoked, never renewed), when it
# is a subscription license that expires within the renewal window.
_DUE = """
    SELECT l.license_id, l.customer_id, l.expires_at, l.cause, p.plan
    FROM license_plans p
    JOIN LATERAL (
        SELECT * FROM licenses l
        WHERE l.customer_id = p.customer_id AND l.revoked_at IS NULL
        ORDER BY l.issued_at DESC, l.expires_at DESC LIMIT 1
    ) l ON true
    WHERE p.subscription_status = 'active' AND p.closed_at IS NULL
      AND l.license_type = ANY($2::text[])
      AND l.expires_at <= $1
      AND ($3::text IS NULL OR p.customer_id = $3)
    ORDER BY l.expires_at
    LIMIT 500
"""


async def renew_due_licenses(
    pool: asyncpg.Pool,
    store: EventStore,
    signer: LicenseSigner,
    now: datetime,
    renew_before: timedelta,
) -> int:
    """Issue the next license for every active subscription whose license is due; how many.

    Each renewal is appended only if the log holds nothing newer about the customer than the
    read models have applied (a cancellation a moment ago must win): ``append_decision``.
    """
    async with pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval(
            "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))", LOCK_KEY
        ):
            return 0  # another replica is on it
        due = await conn.fetch(_DUE, now + renew_before, list(RENEWABLE), None)

        async def still_due(customer_id: str, license_id: str) -> LicenseIssued | None:
            again = await conn.fetchrow(_DUE, now + renew_before, list(RENEWABLE), customer_id)
            if again is None or again["license_id"] != license_id:
                return None  # renewed, canceled or past due since
            return _renewal(again, signer, renew_before)

        return await append_decisions(
            store,
            (
                Decision(
                    customer_id=row["customer_id"],
                    event_id=str(
                        uuid.uuid5(
                            uuid.NAMESPACE_URL,
                            f"renewal-issued:{renewal_license_id(row['license_id'])}",
                        )
                    ),
                    decide=functools.partial(still_due, row["customer_id"], row["license_id"]),
                    cause=cause_from_json(row["cause"], "renewal scheduler"),
                )
                for row in due
            ),
            CONSUMERS,
            "renewal scheduler",
        )


def renewal_license_id(license_id: str) -> str:
    """The id of the license that renews ``license_id``: one renewal per license."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"renewal:{license_id}"))


def _renewal(row: asyncpg.Record, signer: LicenseSigner, renew_before: timedelta) -> LicenseIssued:
    renewal_id = renewal_license_id(row["license_id"])
    # Timed by the license it renews: issued when it became due, running on from its end, so
    # the customer never has a gap and a repeat signs the same token.
    issued_at = row["expires_at"] - renew_before
    return signed_license(
        signer,
        customer_id=row["customer_id"],
        license_id=renewal_id,
        plan_name=row["plan"],
        license_type="renewal",
        issued_at=issued_at,
        expires_at=row["expires_at"] + timedelta(days=SUBSCRIPTION_LICENSE_DAYS),
        grace_until=None,
        reason=f"subscription active: renews license {row['license_id']}",
    )
