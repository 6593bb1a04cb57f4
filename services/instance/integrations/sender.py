"""The integrations' sender: one loop that POSTs to every integration what is due, live and
backfills alike, each from its own position.

Live, an integration is sent the events of its kinds (``integration_events``, up to
``EVENTS_PAGE`` a POST) and the readings stored since it was made (``reading_batches``, which a
trigger fills in the ingest transaction; up to ``READINGS_PAGE`` a POST). Its position moves
only once a POST was answered with success, in the same statement that records it, so a restart
resends at most the POST it was making (receivers dedupe on ``X-Iotistic-Delivery``, or on a
reading's device and time) and loses nothing. A failed POST is retried with backoff (1 s, 2 s,
4 s ... 5 min), for as long as it takes: giving up would lose data, so the integration shows
that it is failing, since when and why, instead. Its running backfill (``backfills``) goes at
its rate from its own cursor, retried the same way.

Integrations are served side by side, so a slow receiver holds up only its own. Nothing is sent
while the license does not include webhooks; the positions wait. Batches of readings every
integration has passed are deleted once a minute, and so are those older than
``positions.BACKLOG_DAYS``: an integration that took nothing for that long (the position
waits at most that long) has the readings it missed still stored, to backfill. The positions
and the SQL that reads and moves them are in ``positions``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
from prometheus_client import CollectorRegistry, Counter

from libs.db.postgres import CONNECTION_ERRORS, Turns
from services.instance.integrations import backfills, positions
from services.instance.integrations.backfills import backoff
from services.instance.integrations.store import READINGS
from services.instance.webhook_posts import post_signed, sender
from services.instance.webhook_targets import WebhookTargets

log = logging.getLogger(__name__)

PRUNE_EVERY = 60.0


class _Client:
    """The HTTP client the POSTs share: made once something is to be sent, closed once nothing
    was for a while (one costs ~30 ms of CPU: not every second in an idle instance)."""

    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None
        self.used = 0.0

    def get(self) -> httpx.AsyncClient:
        self.used = time.monotonic()
        if self._client is None:
            self._client = sender()
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


class IntegrationSender:
    """POSTs to the integrations what is due, live and backfills."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool | Turns],
        customer_id: str,
        sending: Callable[[], bool],
        targets: WebhookTargets | None = None,
        registry: CollectorRegistry | None = None,
        every: float = 1.0,
    ) -> None:
        """``sending`` says whether the license includes webhooks right now; POSTs go only
        where ``targets`` allows. Counters go into ``registry`` (the instance's /metrics)."""
        self._pool = pool
        self._customer = customer_id
        self._sending = sending
        self._targets = targets or WebhookTargets()
        self._every = every
        registry = registry if registry is not None else CollectorRegistry()
        self.errors = Counter(
            "iotistic_instance_integration_errors_total",
            "Unexpected errors sending to integrations, by stage; the rest went on",
            ["stage"],
            registry=registry,
        )
        self.sent = Counter(
            "iotistic_instance_integration_sent_total",
            "Readings and events delivered to integrations, by how (live, backfill)",
            ["how"],
            registry=registry,
        )
        self._prune_at = 0.0
        self._client = _Client()
        # Each integration's POSTs under way, and when (monotonic) it is worth a look again.
        self._inflight: dict[str, asyncio.Task[float]] = {}
        self._due: dict[str, float] = {}

    async def run(self) -> None:
        """Send for ever; an error ends a pass, never the loop. Stopped, it cancels the POSTs
        under way (their positions stay where they were: they are sent again)."""
        try:
            while True:
                try:
                    if self._sending():
                        await self.send_due(datetime.now(UTC))
                    else:
                        await asyncio.sleep(self._every)
                    if time.monotonic() >= self._prune_at:
                        await self.prune()
                        self._prune_at = time.monotonic() + PRUNE_EVERY
                except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                    log.warning("integrations: %s", type(exc).__name__)
                    await asyncio.sleep(self._every)
                except Exception:
                    log.exception("integrations: the pass failed; the next one runs as usual")
                    self.errors.labels("pass").inc()
                    await asyncio.sleep(self._every)
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Cancel the POSTs under way and close the client."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()
        await self._client.close()

    async def send_due(self, now: datetime) -> None:
        """Start the POSTs of each integration that is due and not busy already, then wait
        until one of them is done, or until the next is due (a second at most): integrations
        go side by side, so a slow receiver holds up only its own."""
        async with self._pool().acquire() as conn:
            integrations = await positions.integrations_in_force(conn)
            running = (
                await conn.fetch(
                    "SELECT DISTINCT ON (integration_id) * FROM integration_backfills "
                    "WHERE state IN ('queued', 'running') ORDER BY integration_id, created_at"
                )
                if integrations
                else []
            )
        by_integration = {b["integration_id"]: b for b in running}
        clock = time.monotonic()
        for integration in integrations:
            key = integration["integration_id"]
            if key not in self._inflight and self._due.get(key, 0.0) <= clock:
                self._inflight[key] = asyncio.create_task(
                    self._serve(integration, by_integration.get(key), now)
                )
        known = {i["integration_id"] for i in integrations}
        self._due = {k: v for k, v in self._due.items() if k in known}
        idle = [v for k, v in self._due.items() if k not in self._inflight]
        await self.settle(min([self._every, *(v - clock for v in idle)]))

    async def settle(self, timeout: float | None) -> None:
        """Wait until the POSTs of one integration are done (of all, without ``timeout``),
        or ``timeout`` seconds; note when each that is done is due again."""
        timeout = None if timeout is None else max(timeout, 0.0)
        if self._inflight:
            await asyncio.wait(
                self._inflight.values(),
                timeout=timeout,
                return_when=asyncio.ALL_COMPLETED if timeout is None else asyncio.FIRST_COMPLETED,
            )
        elif timeout:
            await asyncio.sleep(timeout)
        for key, task in list(self._inflight.items()):
            if task.done():
                del self._inflight[key]
                self._due[key] = time.monotonic() + self._outcome(task)
        if not self._inflight and time.monotonic() - self._client.used > 10 * self._every:
            await self._client.close()

    def _outcome(self, task: asyncio.Task[float]) -> float:
        """How soon an integration whose POSTs are done is due again (logging a failure)."""
        try:
            return max(task.result(), 0.0)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            log.warning("integrations: %s", type(exc).__name__)
        except Exception:
            log.exception("integrations: sending failed; tried again at the next pass")
            self.errors.labels("send").inc()
        return self._every

    async def _serve(
        self,
        integration: asyncpg.Record,
        backfill: asyncpg.Record | None,
        now: datetime,
    ) -> float:
        """One integration's due POSTs; how soon it has more (seconds)."""
        wait = self._every
        if integration["next_at"] <= now:
            if await self._send_live(integration, now):
                wait = 0.0
        else:
            wait = min(wait, (integration["next_at"] - now).total_seconds())
        if backfill is not None:
            if backfill["next_at"] <= now:
                await self._send_backfill(integration, backfill, now)
                backfill = await self._backfill_now(backfill["backfill_id"])
            if backfill is not None and backfill["state"] in backfills.ACTIVE:
                wait = min(wait, (backfill["next_at"] - datetime.now(UTC)).total_seconds())
        return wait

    async def _backfill_now(self, backfill_id: str) -> asyncpg.Record | None:
        async with self._pool().acquire() as conn:
            return await conn.fetchrow(
                "SELECT * FROM integration_backfills WHERE backfill_id = $1", backfill_id
            )

    async def _send_live(self, integration: asyncpg.Record, now: datetime) -> bool:
        """POST the integration's new events, then its new readings; whether there were any."""
        kinds = set(integration["kinds"])
        async with self._pool().acquire() as conn:
            events = await positions.new_events(conn, integration) if kinds - {READINGS} else []
            readings = await positions.new_readings(conn, integration) if READINGS in kinds else []
        if events and not await self._send_events(integration, events, now):
            return False
        if readings:
            await self._send_readings(integration, readings, now)
        return bool(events or readings)

    async def _send_events(
        self,
        integration: asyncpg.Record,
        events: list[asyncpg.Record],
        now: datetime,
    ) -> bool:
        """POST the events of the integration's kinds among ``events``, then move past all of
        them; whether that succeeded."""
        wanted = [e for e in events if e["kind"] in integration["kinds"]]
        if wanted:
            body = {
                "type": "events",
                "customer_id": self._customer,
                "integration_id": integration["integration_id"],
                "events": [
                    {
                        "id": e["id"],
                        "kind": e["kind"],
                        "at": e["at"].isoformat(),
                        "device_id": e["device_id"],
                        "body": json.loads(e["body"]),
                    }
                    for e in wanted
                ],
            }
            delivery = f"events:{integration['events_xid']}:{integration['events_id']}"
            error = await self._post(integration, body, delivery)
            if error is not None:
                await self._failed(integration, error, now)
                return False
            self.sent.labels("live").inc(len(wanted))
        async with self._pool().acquire() as conn:
            await positions.passed_events(conn, integration["integration_id"], events[-1], now)
        return True

    async def _send_readings(
        self,
        integration: asyncpg.Record,
        rows: list[asyncpg.Record],
        now: datetime,
    ) -> None:
        """POST the readings still stored among ``rows``, then move past all of them."""
        present = [r for r in rows if r["present"]]
        if present:
            body = self._readings_body(integration["integration_id"], present)
            delivery = (
                f"readings:{integration['readings_xid']}:{integration['readings_id']}:"
                f"{integration['readings_n']}"
            )
            error = await self._post(integration, body, delivery)
            if error is not None:
                await self._failed(integration, error, now)
                return
            self.sent.labels("live").inc(len(present))
        async with self._pool().acquire() as conn:
            await positions.passed_readings(conn, integration["integration_id"], rows[-1], now)

    async def _send_backfill(
        self,
        integration: asyncpg.Record,
        backfill: asyncpg.Record,
        now: datetime,
    ) -> None:
        """Start the backfill if it waits, then POST its next page (or finish it)."""
        backfill_id = backfill["backfill_id"]
        async with self._pool().acquire() as conn:
            if backfill["state"] == "queued":
                await backfills.begin(conn, backfill, now)
                backfill = await conn.fetchrow(
                    "SELECT * FROM integration_backfills WHERE backfill_id = $1", backfill_id
                )
            if backfill is None or backfill["state"] != "running":
                return
            page = await backfills.next_page(conn, backfill)
            if not page:
                await backfills.finish(conn, backfill, now)
                return
        body = self._readings_body(integration["integration_id"], page)
        body["backfill_id"] = backfill_id
        error = await self._post(integration, body, f"backfill:{backfill_id}:{backfill['done']}")
        async with self._pool().acquire() as conn:
            if error is None:
                await backfills.page_delivered(conn, backfill, page, now, datetime.now(UTC))
                self.sent.labels("backfill").inc(len(page))
            else:
                await backfills.page_failed(conn, backfill, error, datetime.now(UTC))

    def _readings_body(self, integration_id: str, rows: list[asyncpg.Record]) -> dict[str, Any]:
        readings = []
        for row in rows:
            reading = {k: v for k, v in dict(row).items() if k not in positions.POSITION_COLUMNS}
            reading["ts"] = row["ts"].isoformat()
            readings.append(reading)
        return {
            "type": "readings",
            "customer_id": self._customer,
            "integration_id": integration_id,
            "readings": readings,
        }

    async def _post(
        self, integration: asyncpg.Record, body: dict[str, Any], delivery: str
    ) -> str | None:
        """One signed POST: None once delivered, else what went wrong."""
        headers = {
            "X-Iotistic-Integration": integration["integration_id"],
            "X-Iotistic-Delivery": delivery,
        }
        try:
            return await post_signed(
                self._client.get(),
                self._targets,
                integration["url"],
                json.dumps(body),
                integration["secret"],
                headers,
            )
        except Exception as exc:
            # Not an answer nor a refusal: a failed attempt like any other, retried.
            log.exception("integrations: a POST to %s failed", integration["integration_id"])
            self.errors.labels("post").inc()
            return f"internal error: {type(exc).__name__}"

    async def _failed(self, integration: asyncpg.Record, error: str, now: datetime) -> None:
        """Record a failed attempt; the next is due after a backoff."""
        async with self._pool().acquire() as conn:
            await positions.delivery_failed(
                conn, integration, error, now, backoff(integration["failures"] + 1)
            )

    async def prune(self) -> int:
        """Delete the batches of readings no integration needs; how many."""
        async with self._pool().acquire() as conn:
            return await positions.prune(conn)
