"""Alert webhooks: the delivery queue, signed POSTs, and their retries.

Each firing and resolution of a rule with a ``webhook_url`` is queued in the same transaction as
its history row, then POSTed, signed with HMAC-SHA256 (``X-Iotistic-Signature: sha256=<hex>``
over ``<timestamp>.<body>``, the timestamp in ``X-Iotistic-Timestamp``), and retried with
backoff (1 s, 2 s, 4 s ... ``MAX_DELIVERY_ATTEMPTS`` tries). The POST goes to an address the
URL's host resolves to at that moment, checked again (``WebhookTargets``). A delivery that fails
in a way nobody foresaw is a failed attempt like any other, logged and counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
from prometheus_client import Counter

from libs.db.postgres import Turns
from services.instance.alerts.targets import WebhookRefused, WebhookTargets

log = logging.getLogger(__name__)

MAX_DELIVERY_ATTEMPTS = 8
# One delivery, all its addresses included: a receiver that trickles its answer cannot hold
# the loop for longer.
DELIVERY_SECONDS = 30.0


def sign(secret: str, timestamp: str, body: str) -> str:
    """``sha256=<hex>`` of HMAC-SHA256(secret, "<timestamp>.<body>")."""
    mac = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


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
        # No proxy from the environment: the connection goes to the address that was checked.
        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            for row in due:
                error = await self._attempt(client, row)
                await self._settle(row, error)
                delivered += error is None
                self._progressed()
        return delivered

    async def _attempt(self, client: httpx.AsyncClient, row: asyncpg.Record) -> str | None:
        """One POST of a delivery: None, or what went wrong."""
        stamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Iotistic-Timestamp": stamp,
            "X-Iotistic-Signature": sign(row["webhook_secret"] or "", stamp, row["body"]),
        }
        try:
            async with asyncio.timeout(DELIVERY_SECONDS):
                return await self._post(client, row["url"], row["body"], headers)
        except TimeoutError:
            return "timed out"
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

    async def _post(
        self, client: httpx.AsyncClient, url: str, body: str, headers: dict[str, str]
    ) -> str | None:
        """POST to an address the URL resolves to now, checked; None, or what went wrong."""
        try:
            target = await self._targets.resolve(url)
        except WebhookRefused as exc:
            log.warning("webhook refused: %s", exc)
            return f"refused: {exc}"[:500]
        error = "not reachable"
        for address in target.addresses:
            pinned, host, extensions = target.via(address)
            try:
                answer = await client.post(
                    pinned, content=body, headers={**headers, **host}, extensions=extensions
                )
            except httpx.ConnectError:
                error = "ConnectError"
                continue  # the next address the name resolved to, checked as well
            except httpx.HTTPError as exc:
                return type(exc).__name__
            return None if answer.status_code < 300 else f"answered {answer.status_code}"
        return error
