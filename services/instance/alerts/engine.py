"""The alert loop: every few seconds, each rule evaluated for each device, then the webhooks
that are due delivered.

A rule fires for a device when the device's newest reading has met its condition continuously
for ``for_seconds`` (pending until then), and resolves when a newer reading no longer meets it;
``no_data`` fires when a device has sent nothing for ``for_seconds``. Each firing and
resolution goes into the history and, with a webhook on the rule, into the delivery queue
(``webhooks``).

Nothing one rule or one delivery does stops the others: a rule that cannot be evaluated (one
stored by an older version, say) is rolled back alone, a delivery that fails in a way nobody
foresaw is recorded as a failed attempt, and either is logged and counted
(``iotistic_instance_alert_errors_total``); the loop itself goes on whatever a pass raised,
and says when it last finished one, which readiness checks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
from prometheus_client import CollectorRegistry, Counter

from libs.db.postgres import CONNECTION_ERRORS, Turns
from services.instance.alerts.rules import NO_DATA, OPERATORS
from services.instance.alerts.targets import WebhookTargets
from services.instance.alerts.webhooks import WebhookDeliveries, enqueue
from services.instance.readings import stored_column

log = logging.getLogger(__name__)

FRESH = timedelta(minutes=10)
# No progress (a pass, a delivery) for this long (at least) means the loop is stuck or dead.
STALLED_AFTER = 60.0


class AlertEngine:
    """Evaluates the rules and delivers the webhooks."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool | Turns],
        customer_id: str,
        alerting: Callable[[], bool],
        every: float = 2.0,
        targets: WebhookTargets | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """``alerting`` says whether the license includes alerting right now; webhooks go only
        where ``targets`` allows (by default: public addresses). The error counter goes into
        ``registry`` (the instance's /metrics)."""
        self._pool = pool
        self._customer = customer_id
        self._alerting = alerting
        self._every = every
        self.errors = Counter(
            "iotistic_instance_alert_errors_total",
            "Unexpected errors in alerting, by stage (a rule's evaluation, a delivery, a pass); "
            "the rest went on",
            ["stage"],
            registry=registry if registry is not None else CollectorRegistry(),
        )
        self._progress = time.monotonic()
        self._failing: set[str] = set()  # rules whose failure was logged with its traceback
        self.webhooks = WebhookDeliveries(
            pool, targets or WebhookTargets(), self.errors, self._progressed
        )

    def _progressed(self) -> None:
        self._progress = time.monotonic()

    def stalled(self) -> bool:
        """True when the loop has made no progress (finished no pass, tried no delivery) for
        a while: it is stuck, dead, or every pass fails (the database is away)."""
        return time.monotonic() - self._progress > max(STALLED_AFTER, 10 * self._every)

    async def run(self) -> None:
        """Evaluate and deliver for ever; an error ends a pass, never the loop."""
        while True:
            await asyncio.sleep(self._every)
            try:
                if self._alerting():
                    await self.evaluate(datetime.now(UTC))
                await self.webhooks.deliver(datetime.now(UTC))
                self._progress = time.monotonic()
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("alerts: %s", type(exc).__name__)
            except Exception:
                # A bug nobody foresaw: logged and counted, and the next pass tries again.
                log.exception("alerts: the pass failed; the next one runs as usual")
                self.errors.labels("pass").inc()

    async def evaluate(self, now: datetime) -> int:
        """One pass over every rule and device; returns how many alerts changed state. A
        rule that cannot be evaluated is rolled back alone, logged and counted."""
        changed = 0
        async with self._pool().acquire() as conn, conn.transaction():
            # A muted rule is not evaluated: it neither fires nor notifies.
            rules = await conn.fetch(
                "SELECT * FROM alert_rules WHERE deleted_at IS NULL AND NOT muted"
            )
            devices = await conn.fetch(
                "SELECT device_id, last_seen FROM devices WHERE deleted_at IS NULL"
            )
            for rule in rules:
                scope = [
                    d for d in devices if not rule["devices"] or d["device_id"] in rule["devices"]
                ]
                try:
                    async with conn.transaction():  # a savepoint: this rule's changes only
                        for device in scope:
                            changed += await self._evaluate_one(conn, rule, device, now)
                except CONNECTION_ERRORS:
                    raise
                except Exception as exc:  # noqa: BLE001 - logged and counted in _rule_failed
                    self._rule_failed(rule["rule_id"], exc)
                else:
                    self._failing.discard(rule["rule_id"])
        return changed

    def _rule_failed(self, rule_id: str, exc: Exception) -> None:
        """Count every failure; log the traceback once per rule, not at every pass."""
        self.errors.labels("evaluate").inc()
        if rule_id in self._failing:
            return
        self._failing.add(rule_id)
        log.error(
            "alerts: rule %s cannot be evaluated (%s); the other rules go on",
            rule_id,
            type(exc).__name__,
            exc_info=exc,
        )

    async def _evaluate_one(
        self, conn: asyncpg.Connection, rule: asyncpg.Record, device: asyncpg.Record, now: datetime
    ) -> int:
        device_id = device["device_id"]
        if rule["metric"] == NO_DATA:
            seen = device["last_seen"]
            value = (now - seen).total_seconds() if seen else None
            # Silence counts from the last message (or from the rule's creation).
            since = seen or rule["created_at"]
            holds, since_true = (now - since).total_seconds() >= rule["for_seconds"], since
            return await self._transition(
                conn, rule, device_id, holds, since_true, now, value, True
            )
        newest = await conn.fetchrow(
            f"SELECT ts, {stored_column(rule['metric'])} AS v FROM readings WHERE device_id = $1 "
            f"AND ts > $2 ORDER BY ts DESC LIMIT 1",
            device_id,
            now - FRESH,
        )
        if newest is None or newest["v"] is None:
            return 0
        holds = OPERATORS[rule["operator"]](newest["v"], rule["threshold"])
        return await self._transition(
            conn, rule, device_id, holds, newest["ts"], now, newest["v"], False
        )

    async def _transition(
        self,
        conn: asyncpg.Connection,
        rule: asyncpg.Record,
        device_id: str,
        holds: bool,
        since_true: datetime,
        now: datetime,
        value: float | None,
        silence: bool,
    ) -> int:
        state = await conn.fetchrow(
            "SELECT * FROM alert_states WHERE rule_id = $1 AND device_id = $2",
            rule["rule_id"],
            device_id,
        )
        current = state["state"] if state else "ok"
        if holds and current == "ok":
            await self._set(conn, rule, device_id, "pending", since_true, value)
            current, state_since = "pending", since_true
        else:
            state_since = state["since"] if state else now
        if holds and current == "pending":
            if silence or (now - state_since).total_seconds() >= rule["for_seconds"]:
                await self._set(conn, rule, device_id, "firing", state_since, value)
                await self._record(conn, rule, device_id, "firing", now, value)
                return 1
            return 0
        if not holds and current in ("pending", "firing"):
            await self._set(conn, rule, device_id, "ok", now, value)
            if current == "firing":
                await self._record(conn, rule, device_id, "resolved", now, value)
                return 1
        return 0

    async def _set(
        self,
        conn: asyncpg.Connection,
        rule: asyncpg.Record,
        device_id: str,
        state: str,
        since: datetime,
        value: float | None,
    ) -> None:
        await conn.execute(
            "INSERT INTO alert_states (rule_id, device_id, state, since, value) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (rule_id, device_id) DO UPDATE SET "
            "state = $3, since = $4, value = $5",
            rule["rule_id"],
            device_id,
            state,
            since,
            value,
        )

    async def _record(
        self,
        conn: asyncpg.Connection,
        rule: asyncpg.Record,
        device_id: str,
        event: str,
        now: datetime,
        value: float | None,
    ) -> None:
        what = (
            "no data"
            if rule["metric"] == NO_DATA
            else (f"{rule['metric']} {rule['operator']} {rule['threshold']:g}")
        )
        message = f"{rule['name']}: {what} on device {device_id} {event}"
        await conn.execute(
            "INSERT INTO alert_history (rule_id, device_id, event, at, value, message) "
            "VALUES ($1, $2, $3, $4, $5, $6)",
            rule["rule_id"],
            device_id,
            event,
            now,
            value,
            message,
        )
        if rule["webhook_url"]:
            body = json.dumps(
                {
                    "customer_id": self._customer,
                    "rule_id": rule["rule_id"],
                    "rule": rule["name"],
                    "device_id": device_id,
                    "event": event,
                    "metric": rule["metric"],
                    "value": value,
                    "at": now.isoformat(),
                    "message": message,
                }
            )
            await enqueue(conn, rule["rule_id"], rule["webhook_url"], body, now)
