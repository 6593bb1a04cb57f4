"""Alert webhooks: the delivery queue, signed POSTs, and their retries.

Each firing and resolution of a rule with a ``webhook_url`` is queued in the same transaction as
its history row, then POSTed signed (``webhook_posts``, shared with integrations), and retried
with backoff (1 s, 2 s, 4 s ... ``MAX_DELIVERY_ATTEMPTS`` tries). The POST goes to an address
the URL's host resolves to at that moment, checked again (``WebhookTargets``). A delivery that fails
in a way nobody foresaw is a failed attempt like any other, logged and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
from prometheus_client import Counter

from libs.db.postgres import Turns
from services.instance.alerts.targets import WebhookTargets
from services.instance.webhook_posts import post_signed, sender, sign

__all__ = ["MAX_DELIVERY_ATTEMPTS", "WebhookDeliveries", "enqueue", "sign"]

log = logging.getLogger(__name__)

MAX_DELIVERY_ATTEMPTS = 8


async def enqueue(
    conn: asyncpg.Connection, rule_id: str, url: str, body: str, now: datetime
) -> None:
    """Queue a delivery, due now (in the caller's transaction)."""
    await conn.execute(
        "INSERT INTO webhook_deliveries (rule_id, url, body, next_at) VALUES ($1, $2, $3, $4)",
        rule_id,
        url,
        body,
        now,
    )


class WebhookDeliveries:
    """POSTs the queued deliveries that are due."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool | Turns],
        targets: WebhookTargets,
        errors: Counter,
        progressed: Callable[[], None],
    ) -> None:
        """``errors`` counts unforeseen failures (label ``deliver``); ``progressed`` is told
        after each attempt (the alert loop's liveness)."""
        self._pool = pool
        self._targets = targets
        self._errors = errors
        self._progressed = progressed

    async def deliver(self, now: datetime) -> int:
        """POST the webhooks that are due; failures back off (1 s, 2 s, 4 s ... 8 tries)."""
        async with self._pool().acquire() as conn:
            due = await conn.fetch(
                "SELECT d.*, r.webhook_secret FROM webhook_deliveries d "
                "JOIN alert_rules r USING (rule_id) WHERE d.delivered_at IS NULL "
                "AND d.next_at <= $1 AND d.attempts < $2 ORDER BY d.id LIMIT 50",
                now,
                MAX_DELIVERY_ATTEMPTS,
            )
        if not due:
            # Most passes: nothing to send, and no client made (one costs ~30 ms of CPU,
            # every 2 s in each of hundreds of idle instances).
            return 0
        delivered = 0
        async with sender() as client:
            for row in due:
                error = await self._attempt(client, row)
                await self._settle(row, error)
                delivered += error is None
                self._progressed()
        return delivered

    async def _attempt(self, client: httpx.AsyncClient, row: asyncpg.Record) -> str | None:
        """One POST of a delivery: None, or what went wrong."""
        try:
            return await post_signed(
                client, self._targets, row["url"], row["body"], row["webhook_secret"] or ""
            )
        except Exception as exc:
            # Not an answer nor a refusal: a failed attempt like any other (retried, then
            # given up), so it cannot hold back the deliveries after it.
            log.exception("alerts: delivery %s failed unexpectedly", row["id"])
            self._errors.labels("deliver").inc()
            return f"internal error: {type(exc).__name__}"

    async def _settle(self, row: asyncpg.Record, error: str | None) -> None:
        """Record the attempt: delivered, or due again after a backoff."""
        async with self._pool().acquire() as conn:
            if error is None:
                await conn.execute(
                    "UPDATE webhook_deliveries SET delivered_at = $2, "
                    "attempts = attempts + 1 WHERE id = $1",
                    row["id"],
                    datetime.now(UTC),
                )
            else:
                backoff = timedelta(seconds=2 ** row["attempts"])
                await conn.execute(
                    "UPDATE webhook_deliveries SET attempts = attempts + 1, "
                    "last_error = $2, next_at = $3 WHERE id = $1",
                    row["id"],
                    error,
                    datetime.now(UTC) + backoff,
                )
