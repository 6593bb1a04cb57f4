"""The alert loop: every few seconds, each rule evaluated for each device, then the webhooks
that are due delivered.

A threshold rule fires for a device when the device's newest reading has met its condition
continuously for ``for_seconds`` (pending until then), and resolves when a newer reading no
longer meets it; ``no_data`` fires when a device has sent nothing for ``for_seconds``. The
indoor-air kinds (offline, mould risk, stale sensor, CO₂) are evaluated by ``indoor``. Readings
taken before the sensor was calibrated are left out unless the rule says
``include_calibrating``. Each firing and resolution goes into the history with why
(``history``), to the integrations' outbox and, with a webhook on the rule, into the delivery
queue (``webhooks``).

Nothing one rule or one delivery does stops the others: a rule that cannot be evaluated (one
stored by an older version, say) is rolled back alone, a delivery that fails in a way nobody
foresaw is recorded as a failed attempt, and either is logged and counted
(``iotistic_instance_alert_errors_total``); the loop itself goes on whatever a pass raised,
and says when it last finished one, which readiness checks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
from prometheus_client import CollectorRegistry, Counter

from libs.db.postgres import CONNECTION_ERRORS, Turns
from services.instance.alerts.history import record_event, set_state
from services.instance.alerts.indoor import (
    Pass,
    evaluate_offline,
    evaluate_readings,
    in_scope,
    load_pass,
)
from services.instance.alerts.kinds import OFFLINE, READING_KINDS, THRESHOLD, duration_text
from services.instance.alerts.rules import NO_DATA, OPERATORS
from services.instance.alerts.targets import WebhookTargets
from services.instance.alerts.webhooks import WebhookDeliveries
from services.instance.alerts.windows import stamp
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
            ctx = await load_pass(conn, rules, devices, now)
            for rule in rules:
                try:
                    async with conn.transaction():  # a savepoint: this rule's changes only
                        for device in in_scope(rule, devices):
                            changed += await self._evaluate_one(conn, rule, device, ctx, now)
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
        self,
        conn: asyncpg.Connection,
        rule: asyncpg.Record,
        device: asyncpg.Record,
        ctx: Pass,
        now: datetime,
    ) -> int:
        device_id, kind = device["device_id"], rule["kind"]
        if kind == OFFLINE:
            return await evaluate_offline(conn, self._customer, rule, device, ctx, now)
        if kind in READING_KINDS:
            return await evaluate_readings(conn, self._customer, rule, device_id, ctx, now)
        if kind != THRESHOLD:
            raise ValueError(f"unknown rule kind {kind!r}")
        if rule["metric"] == NO_DATA:
            seen = device["last_seen"]
            value = (now - seen).total_seconds() if seen else None
            # Silence counts from the last message (or from the rule's creation).
            since = seen or rule["created_at"]
            holds, since_true = (now - since).total_seconds() >= rule["for_seconds"], since
            why = _Why(
                fired=lambda _: (
                    f"no data since {stamp(since)} "
                    f"({duration_text((now - since).total_seconds())}; "
                    f"threshold {rule['for_seconds']} s)"
                ),
                resolved=f"data again: last message at {stamp(seen)}" if seen else "data again",
            )
            return await self._transition(
                conn, rule, device_id, holds, since_true, now, value, True, why
            )
        # The newest reading, leaving out those taken before calibration unless asked.
        newest = await conn.fetchrow(
            f"SELECT ts, {stored_column(rule['metric'])} AS v FROM readings WHERE device_id = $1 "
            "AND ts > $2 AND ($3 OR iaq_accuracy IS NULL OR iaq_accuracy >= 3) "
            "ORDER BY ts DESC LIMIT 1",
            device_id,
            now - FRESH,
            rule["include_calibrating"],
        )
        if newest is None or newest["v"] is None:
            return 0
        holds = OPERATORS[rule["operator"]](newest["v"], rule["threshold"])
        metric, operator, threshold = rule["metric"], rule["operator"], rule["threshold"]
        value, at = newest["v"], stamp(newest["ts"])
        why = _Why(
            fired=lambda since: (
                f"{metric} {value:g} {operator} {threshold:g} in the newest reading ({at}), met "
                f"since {stamp(since)} (threshold {operator} {threshold:g} for "
                f"{rule['for_seconds']} s)"
            ),
            resolved=f"{metric} {value:g} at {at}, not {operator} {threshold:g}",
        )
        return await self._transition(
            conn, rule, device_id, holds, newest["ts"], now, newest["v"], False, why
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
        why: _Why,
    ) -> int:
        rule_id = rule["rule_id"]
        state = await conn.fetchrow(
            "SELECT * FROM alert_states WHERE rule_id = $1 AND device_id = $2", rule_id, device_id
        )
        current = state["state"] if state else "ok"
        if holds and current == "ok":
            await set_state(conn, rule_id, device_id, "pending", since_true, value)
            current, state_since = "pending", since_true
        else:
            state_since = state["since"] if state else now
        if holds and current == "pending":
            if silence or (now - state_since).total_seconds() >= rule["for_seconds"]:
                fired = why.fired(state_since)
                await set_state(conn, rule_id, device_id, "firing", state_since, value, fired)
                await self._record(conn, rule, device_id, "firing", now, value, fired)
                return 1
            return 0
        if not holds and current in ("pending", "firing"):
            await set_state(conn, rule_id, device_id, "ok", now, value)
            if current == "firing":
                await self._record(conn, rule, device_id, "resolved", now, value, why.resolved)
                return 1
        return 0

    async def _record(
        self,
        conn: asyncpg.Connection,
        rule: asyncpg.Record,
        device_id: str,
        event: str,
        now: datetime,
        value: float | None,
        explanation: str,
    ) -> None:
        await record_event(conn, self._customer, rule, device_id, event, now, value, explanation)


@dataclass(frozen=True)
class _Why:
    """How a threshold rule's firing (from when its condition was first met) and its
    resolution are explained."""

    fired: Callable[[datetime], str]
    resolved: str
