"""The trial scheduler: trials that ended unpaid expire, once, on one replica at a time.

It keeps no state of its own: the subscriptions read model says which trials have ended and
are still trialing, so a restart (or a replica taking over) simply finds them again. The id of
each TrialExpired comes from the trial itself, so two passes over the same trial append it once.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg

from contracts import TrialExpired
from libs.eventstore import EventStore
from libs.projections import TRANSIENT_ERRORS
from libs.runtime import ServiceUnavailable

log = logging.getLogger(__name__)

LOCK_KEY = "billing:trial-scheduler"
# Failures that pass: the next pass tries again.
PASSING: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, ServiceUnavailable)


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


async def trial_scheduler_loop(
    get_pool: Callable[[], asyncpg.Pool], get_store: Callable[[], EventStore], every: float
) -> None:
    """Expire ended trials every ``every`` seconds, riding out outages."""
    while True:
        try:
            expired = await expire_ended_trials(get_pool(), get_store(), datetime.now(UTC))
            if expired:
                log.info("trial scheduler: %d trial(s) expired", expired)
        except PASSING as exc:
            log.warning("trial scheduler: %r; next pass in %.0fs", exc, every)
        await asyncio.sleep(every)
