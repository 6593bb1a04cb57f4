"""Alert rules: checked as a customer sends them, stored, listed and deleted.

A rule ``{metric, operator, threshold, for_seconds, devices}`` fires for a device when the
device's newest reading has met the condition continuously for ``for_seconds``; the metric
``no_data`` fires when a device has sent nothing for ``for_seconds``. With a ``webhook_url``
(the license's ``webhooks`` feature) each firing and resolution is also POSTed there, signed
with a secret made for the rule and shown once, in the answer to its creation.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from libs.http.validation import FieldErrors, json_object
from services.instance.alerts.targets import WebhookRefused, WebhookTargets
from services.instance.readings import METRICS

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">": lambda v, t: v > t,
    ">=": lambda v, t: v >= t,
    "<": lambda v, t: v < t,
    "<=": lambda v, t: v <= t,
}
NO_DATA = "no_data"
MAX_URL_LENGTH = 2048
RULE_FIELDS = ("name", "metric", "operator", "threshold", "for_seconds", "devices", "webhook_url")
INVALID_RULE = "invalid rule"


class WebhooksNotLicensed(Exception):
    """The rule names a webhook and the license does not include webhooks."""


class NewRule(msgspec.Struct, frozen=True, kw_only=True):
    """A rule as it was asked for, checked, not stored yet."""

    name: str
    metric: str
    operator: str | None
    threshold: float | None
    for_seconds: int
    devices: list[str]
    webhook_url: str | None


def _check_condition(data: dict[str, Any], errors: FieldErrors) -> None:
    """Record what is wrong with the rule's fields before its webhook, in a fixed order."""
    errors.unknown(data, RULE_FIELDS)
    metric = data.get("metric")
    if metric not in (*METRICS, NO_DATA):
        errors.add("metric", f"must be one of {', '.join((*METRICS, NO_DATA))}")
    elif metric != NO_DATA:
        if data.get("operator") not in OPERATORS:
            errors.add("operator", f"must be one of {' '.join(OPERATORS)}")
        threshold = data.get("threshold")
        if not isinstance(threshold, int | float) or isinstance(threshold, bool):
            errors.add("threshold", "must be a number")
    for_seconds = data.get("for_seconds", 0)
    if (
        not isinstance(for_seconds, int)
        or isinstance(for_seconds, bool)
        or not 0 <= for_seconds <= 86400
    ):
        errors.add("for_seconds", "must be whole seconds from 0 to 86400")
    devices = data.get("devices", [])
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        errors.add("devices", "must be a list of device ids (empty: every device)")


async def _check_webhook(url: Any, webhooks_allowed: bool, targets: WebhookTargets) -> None:
    """A webhook URL must be licensed, an http(s) URL, and lead only to allowed addresses."""
    if not webhooks_allowed:
        raise WebhooksNotLicensed("the license does not include webhooks")
    errors = FieldErrors()
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        errors.add("webhook_url", "must be an http(s) URL")
    elif len(url) > MAX_URL_LENGTH:
        errors.add("webhook_url", f"must be at most {MAX_URL_LENGTH} characters")
    else:
        try:
            await targets.resolve(url)
        except WebhookRefused as exc:
            errors.add("webhook_url", str(exc))
    errors.raise_if_any(INVALID_RULE)


async def parse_rule(
    data: Any, webhooks_allowed: bool, targets: WebhookTargets | None = None
) -> NewRule:
    """A rule from a request body, or a 400 naming each bad field; ``WebhooksNotLicensed`` for
    a webhook the license does not include. The webhook URL is looked at only once the rest is
    right (its host is resolved, which may take seconds) and must lead to an address
    ``targets`` allows (by default: public ones only)."""
    body = json_object(data, INVALID_RULE)
    errors = FieldErrors()
    _check_condition(body, errors)
    errors.raise_if_any(INVALID_RULE)
    url = body.get("webhook_url")
    if url is not None:
        await _check_webhook(url, webhooks_allowed, targets or WebhookTargets())
    metric, operator, threshold = body["metric"], body.get("operator"), body.get("threshold")
    name = body.get("name") or f"{metric} {operator or ''} {threshold or ''}".strip()
    return NewRule(
        name=str(name)[:100],
        metric=metric,
        operator=operator if metric != NO_DATA else None,
        threshold=float(threshold) if isinstance(threshold, int | float) else None,
        for_seconds=body.get("for_seconds", 0),
        devices=body.get("devices", []),
        webhook_url=url,
    )


async def create_rule(conn: asyncpg.Connection, rule: NewRule) -> dict[str, Any]:
    """Store the rule; a webhook secret is made for it and shown once."""
    rule_id = uuid.uuid4().hex[:16]
    secret = secrets.token_urlsafe(32) if rule.webhook_url else None
    await conn.execute(
        "INSERT INTO alert_rules (rule_id, name, metric, operator, threshold, for_seconds, "
        "devices, webhook_url, webhook_secret, created_at) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        rule_id,
        rule.name,
        rule.metric,
        rule.operator,
        rule.threshold,
        rule.for_seconds,
        rule.devices,
        rule.webhook_url,
        secret,
        datetime.now(UTC),
    )
    return {"rule_id": rule_id, **msgspec.structs.asdict(rule), "webhook_secret": secret}


async def rules_with_states(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """The rules in force (without their secrets), each with every device's state under it."""
    rules = await conn.fetch(
        "SELECT rule_id, name, metric, operator, threshold, for_seconds, devices, "
        "webhook_url, created_at FROM alert_rules WHERE deleted_at IS NULL "
        "ORDER BY created_at"
    )
    states = await conn.fetch("SELECT * FROM alert_states")
    by_rule: dict[str, list[dict[str, Any]]] = {}
    for state in states:
        by_rule.setdefault(state["rule_id"], []).append(dict(state))
    return [{**dict(r), "states": by_rule.get(r["rule_id"], [])} for r in rules]


async def delete_rule(conn: asyncpg.Connection, rule_id: str) -> bool:
    """Stop evaluating a rule (its history stays); False when there is no such rule."""
    done = await conn.execute(
        "UPDATE alert_rules SET deleted_at = now() WHERE rule_id = $1 AND deleted_at IS NULL",
        rule_id,
    )
    await conn.execute("DELETE FROM alert_states WHERE rule_id = $1", rule_id)
    return not done.endswith(" 0")


async def recent_alert_history(conn: asyncpg.Connection, limit: int = 200) -> list[dict[str, Any]]:
    """Firings and resolutions, newest first."""
    rows = await conn.fetch("SELECT * FROM alert_history ORDER BY id DESC LIMIT $1", limit)
    return [dict(r) for r in rows]
