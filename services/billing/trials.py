"""The trial scheduler: trials that ended unpaid expire, once, on one replica at a time.

It keeps no state of its own: the subscriptions read model says which trials have ended and
are still trialing, so a restart (or a replica taking over) simply finds them again. The id of
each TrialExpired comes from the trial itself, so two passes over the same trial append it once.
"""

from __future__ import annotations

import functools
import uuid
from datetime import datetime

import asyncpg

from contracts import TrialExpired
from libs.eventlog.decisions import Decision, append_decisions
from libs.eventlog.store import EventStore
from libs.projections.runner import durable_name

LOCK_KEY = "billing:trial-scheduler"
# The consumers behind the subscriptions read model the decision is taken from.
CONSUMERS = (durable_name("billing", "subscriptions"),)


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
        ended = await conn.fetch(
            "SELECT customer_id, trial_ends_at FROM subscriptions "
            "WHERE status = 'trialing' AND trial_ends_at <= $1 ORDER BY trial_ends_at LIMIT 500",
            now,
        )

        async def still_ended(customer_id: str) -> TrialExpired | None:
            ends = await conn.fetchval(
                "SELECT trial_ends_at FROM subscriptions WHERE customer_id = $1 "
                "AND status = 'trialing' AND trial_ends_at <= $2",
                customer_id,
                now,
            )
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
