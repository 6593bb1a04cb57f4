"""The trial scheduler: trials that ended unpaid expire, once, on one replica at a time.

It keeps no state of its own: the subscriptions read model says which trials have ended and
are still trialing, so a restart (or a replica taking over) simply finds them again. The id of
each TrialExpired comes from the trial itself, so two passes over the same trial append it once.
A closed account's trial ended with the account: it never expires (no ``TrialExpired``, hence no
final license for an account that has none to run). The closure is read from
``account_access``, whose consumer the decision also waits for, so a ``CustomerClosed`` on the
log that the read models have not applied yet makes the append conflict and the trial is
looked at again once they have. Each TrialExpired is caused by the TrialStarted it ends (kept
by the read model as ``trial_cause``), so it carries the signup's correlation id and its
``schedule TrialExpired`` span links to the trial's trace.
"""

from __future__ import annotations

import functools
import uuid
from datetime import datetime

import asyncpg

from contracts import TrialExpired
from libs.eventlog.decisions import Decision, append_decisions, cause_from_json
from libs.eventlog.store import EventStore
from libs.projections.runner import durable_name

LOCK_KEY = "billing:trial-scheduler"
# The consumers behind the read models the decision is taken from: the subscriptions, and
# which accounts are closed.
CONSUMERS = (durable_name("billing", "subscriptions"), durable_name("billing", "account_access"))
# Trials that ended by $1 (of customer $2 when given), still trialing, of open accounts.
_ENDED = """
    SELECT s.customer_id, s.trial_ends_at, s.trial_cause FROM subscriptions s
    WHERE s.status = 'trialing' AND s.trial_ends_at <= $1
      AND ($2::text IS NULL OR s.customer_id = $2)
      AND NOT EXISTS (SELECT 1 FROM account_access a
                      WHERE a.customer_id = s.customer_id AND a.closed_at IS NOT NULL)
    ORDER BY s.trial_ends_at LIMIT 500
"""


async def expire_ended_trials(pool: asyncpg.Pool, store: EventStore, now: datetime) -> int:
    """Append TrialExpired for every trial that ended by ``now``; returns how many.

    The subscriptions read model says which trials look ended; each is expired only if the log
    holds nothing newer about the customer than that read model has applied (a subscription
    activated a moment ago must win), checked by ``append_decision``.
    """
    async with pool.acquire() as conn, conn.transaction():
        # One replica at a time; the others find the lock taken and skip this pass.
        if not await conn.fetchval(
            "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))", LOCK_KEY
        ):
            return 0
        ended = await conn.fetch(_ENDED, now, None)

        async def still_ended(customer_id: str) -> TrialExpired | None:
            again = await conn.fetchrow(_ENDED, now, customer_id)
            ends = None if again is None else again["trial_ends_at"]
            return (
                None if ends is None else TrialExpired(customer_id=customer_id, trial_ended_at=ends)
            )

        return await append_decisions(
            store,
            (
                Decision(
                    customer_id=row["customer_id"],
                    event_id=trial_expired_id(row["customer_id"], row["trial_ends_at"]),
                    decide=functools.partial(still_ended, row["customer_id"]),
                    cause=cause_from_json(row["trial_cause"], "trial scheduler"),
                )
                for row in ended
            ),
            CONSUMERS,
            "trial scheduler",
        )


def trial_expired_id(customer_id: str, trial_ends_at: datetime) -> str:
    """The id of a trial's TrialExpired: one per trial, whichever pass appends it."""
    return str(
        uuid.uuid5(uuid.NAMESPACE_URL, f"trial-expired:{customer_id}:{trial_ends_at.isoformat()}")
    )
