"""What a rule did for a device: its state now (``alert_states``), and each firing and
resolution, with why (``alert_history``), queued for the rule's webhook and appended to the
integrations' outbox (``integration_events``, kind ``alert``), all in the caller's transaction.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import asyncpg

from services.instance import integration_events
from services.instance.alerts.webhooks import enqueue


async def set_state(
    conn: asyncpg.Connection,
    rule_id: str,
    device_id: str,
    state: str,
    since: datetime,
    value: float | None,
    explanation: str | None = None,
) -> None:
    """The device's state under the rule (``ok``, ``pending`` or ``firing``) since ``since``."""
    await conn.execute(
        "INSERT INTO alert_states (rule_id, device_id, state, since, value, explanation) "
        "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (rule_id, device_id) DO UPDATE SET "
        "state = $3, since = $4, value = $5, explanation = $6",
        rule_id,
        device_id,
        state,
        since,
        value,
        explanation,
    )


def _what(rule: asyncpg.Record) -> str:
    kind: str = rule["kind"]
    if kind != "threshold":
        return kind.replace("_", " ")
    if rule["metric"] == "no_data":
        return "no data"
    return f"{rule['metric']} {rule['operator']} {rule['threshold']:g}"


async def record_event(
    conn: asyncpg.Connection,
    customer_id: str,
    rule: asyncpg.Record,
    device_id: str,
    event: str,
    now: datetime,
    value: float | None,
    explanation: str | None,
    evidence: dict[str, Any] | None = None,
) -> None:
    """One firing or resolution, with its explanation and evidence: in the history, to the
    rule's webhook (if it has one) and to the integrations."""
    message = f"{rule['name']}: {_what(rule)} on device {device_id} {event}"
    evidence_json = json.dumps(evidence, default=str) if evidence is not None else None
    await conn.execute(
        "INSERT INTO alert_history (rule_id, device_id, event, at, value, message, explanation, "
        "evidence) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb)",
        rule["rule_id"],
        device_id,
        event,
        now,
        value,
        message,
        explanation,
        evidence_json,
    )
    body = {
        "customer_id": customer_id,
        "rule_id": rule["rule_id"],
        "rule": rule["name"],
        "kind": rule["kind"],
        "device_id": device_id,
        "event": event,
        "metric": rule["metric"],
        "value": value,
        "at": now.isoformat(),
        "message": message,
        "explanation": explanation,
        "evidence": evidence,
    }
    if rule["webhook_url"]:
        await enqueue(
            conn, rule["rule_id"], rule["webhook_url"], json.dumps(body, default=str), now
        )
    await integration_events.enqueue(conn, integration_events.ALERT, body, now, device_id)


async def recent_alert_history(conn: asyncpg.Connection, limit: int = 200) -> list[dict[str, Any]]:
    """Firings and resolutions, newest first."""
    rows = await conn.fetch(
        "SELECT id, rule_id, device_id, event, at, value, message, explanation, "
        "evidence::text AS evidence FROM alert_history ORDER BY id DESC LIMIT $1",
        limit,
    )
    return [
        {**dict(r), "evidence": json.loads(r["evidence"]) if r["evidence"] else None} for r in rows
    ]
