"""The trial scheduler: trials that ended unpaid expire, once, on one replica at a time.

It keeps no state of its own: the subscriptions read model says which trials have ended and
are still trialing, so a restart (or a replica taking over) simply finds them again. The id of
each TrialExpired comes from the trial itself, so two passes over the same trial append it once.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime

import asyncpg

from contracts import TrialExpired
from libs.decisions import ReadModelBehind, append_decision
from libs.eventstore import EventStore
from libs.projections import durable_name

log = logging.getLogger(__name__)

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
            "SELECT customer_id FROM subscriptions "
            "WHERE status = 'trialing' AND trial_ends_at <= $1 ORDER BY trial_ends_at LIMIT 500",
            now,
        )
        expired = 0
        for row in ended:
            customer_id = row["customer_id"]

            async def still_ended(customer_id: str = customer_id) -> TrialExpired | None:
                ends = await conn.fetchval(
                    "SELECT trial_ends_at FROM subscriptions WHERE customer_id = $1 "
                    "AND status = 'trialing' AND trial_ends_at <= $2",
                    customer_id,
                    now,
                )
                if ends is None:
                    return None
                return TrialExpired(customer_id=customer_id, trial_ended_at=ends)

            ends = await conn.fetchval(
                "SELECT trial_ends_at FROM subscriptions WHERE customer_id = $1", customer_id
            )
            try:
                appended = await append_decision(
                    store,
                    customer_id=customer_id,
                    event_id=trial_expired_id(customer_id, ends),
                    decide=still_ended,
                    consumers=CONSUMERS,
                )
            except ReadModelBehind as behind:
                log.warning("trial scheduler: %s; the next pass decides", behind)
                break
            expired += appended is not None
        return expired


def trial_expired_id(customer_id: str, trial_ends_at: datetime) -> str:
    """The id of a trial's TrialExpired: one per trial, whichever pass appends it."""
    return str(
        uuid.uuid5(uuid.NAMESPACE_URL, f"trial-expired:{customer_id}:{trial_ends_at.isoformat()}")
    )
