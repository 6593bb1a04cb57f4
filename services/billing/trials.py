"""The trial scheduler: trials that ended unpaid expire, once, on one replica at a time.

It keeps no state of its own: the subscriptions read model says which trials have ended and
are still trialing, so a restart (or a replica taking over) simply finds them again. The id of
each TrialExpired comes from the trial itself, so two passes over the same trial append it once.
"""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg

from contracts import TrialExpired
from libs.eventstore import EventStore

LOCK_KEY = "billing:trial-scheduler"


async def expire_ended_trials(pool: asyncpg.Pool, store: EventStore, now: datetime) -> int:
    """Append TrialExpired for every trial that ended by ``now``; returns how many."""
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
        for row in ended:
            await store.publish(
                TrialExpired(customer_id=row["customer_id"], trial_ended_at=row["trial_ends_at"]),
                customer_id=row["customer_id"],
                event_id=str(
                    uuid.uuid5(
                        uuid.NAMESPACE_URL,
                        f"trial-expired:{row['customer_id']}:{row['trial_ends_at'].isoformat()}",
                    )
                ),
            )
        return len(ended)
