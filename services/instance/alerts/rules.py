"""Alert rules: checked as a customer sends them, stored, listed, changed, muted and deleted.

A threshold rule ``{metric, operator, threshold, for_seconds, devices}`` fires for a device
when the device's newest reading has met the condition continuously for ``for_seconds``; the
metric ``no_data`` fires when a device has sent nothing for ``for_seconds``. A rule of an
indoor-air ``kind`` (``kinds``: offline, mould_risk, stale_sensor, co2_high) has ``params``
instead, each defaulted and tunable. ``include_calibrating`` makes a rule look at readings taken
before the sensor was calibrated too (by default they are left out). With a ``webhook_url``
(the license's ``webhooks`` feature) each firing and resolution is also POSTed there, signed
with a secret made for the rule and shown once, in the answer to its creation (or to the change
that gave it a new webhook URL). A muted rule is kept but not evaluated: it neither fires nor
notifies, and muting it drops the notifications still waiting to be delivered.

Longer than 400 lines because it is the one place where a rule of every kind is checked,
stored and changed: a field added to one must be added to all of these together.
"""

from __future__ import annotations

import json
import math
import secrets
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from libs.http.validation import FieldErrors, json_object
from services.instance.alerts.kinds import (
    KINDS,
    THRESHOLD,
    check_params,
    condition_text,
    defaults,
    stored_params,
)
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
RULE_FIELDS = (
    "name",
    "metric",
    "operator",
    "threshold",
    "for_seconds",
    "devices",
    "webhook_url",
    "muted",
    "kind",
    "include_calibrating",
)
# The fields of a rule of an indoor-air kind: its parameters instead of a condition.
KIND_FIELDS = (
    "name",
    "kind",
    "params",
    "devices",
    "webhook_url",
    "muted",
    "include_calibrating",
)
NAME_LIMIT = 100
MAX_DEVICES = 1000
INVALID_RULE = "invalid rule"


class WebhooksNotLicensed(Exception):
    """The rule names a webhook and the license does not include webhooks."""


class NewRule(msgspec.Struct, frozen=True, kw_only=True):
    """A rule as it was asked for, checked, not stored yet."""

    name: str
    metric: str | None
    operator: str | None
    threshold: float | None
    for_seconds: int
    devices: list[str]
    webhook_url: str | None
    muted: bool = False
    kind: str = THRESHOLD
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    include_calibrating: bool = False


def _check_common(data: dict[str, Any], errors: FieldErrors) -> None:
    """The fields every kind of rule has: its devices, muting, calibration and name."""
    devices = data.get("devices", [])
    if (
        not isinstance(devices, list)
        or len(devices) > MAX_DEVICES
        or not all(isinstance(d, str) and len(d) <= NAME_LIMIT for d in devices)
    ):
        errors.add("devices", "must be a list of device ids (empty: every device)")
    for flag in ("muted", "include_calibrating"):
        if not isinstance(data.get(flag, False), bool):
            errors.add(flag, "must be true or false")
    errors.text(data, "name", required=False, limit=NAME_LIMIT)


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
        elif not _finite(threshold):
            errors.add("threshold", "must be a finite number")
    for_seconds = data.get("for_seconds", 0)
    if (
        not isinstance(for_seconds, int)
        or isinstance(for_seconds, bool)
        or not 0 <= for_seconds <= 86400
    ):
        errors.add("for_seconds", "must be whole seconds from 0 to 86400")
    _check_common(data, errors)


def _finite(number: float) -> bool:
    try:
        return math.isfinite(float(number))
    except OverflowError:  # an integer too large for a float
        return False


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
    kind = body.get("kind", THRESHOLD)
    if kind not in KINDS:
        errors = FieldErrors()
        errors.add("kind", f"must be one of {', '.join(KINDS)}")
        errors.raise_if_any(INVALID_RULE)
    if kind != THRESHOLD:
        return await _parse_kind_rule(body, kind, webhooks_allowed, targets)
    errors = FieldErrors()
    _check_condition(body, errors)
    errors.raise_if_any(INVALID_RULE)
    url = body.get("webhook_url")
    if url is not None:
        await _check_webhook(url, webhooks_allowed, targets or WebhookTargets())
    metric, operator, threshold = body["metric"], body.get("operator"), body.get("threshold")
    name = str(body.get("name") or "").strip()
    if not name:
        name = f"{metric} {operator or ''} {'' if threshold is None else threshold}".strip()
    return NewRule(
        name=name[:NAME_LIMIT],
        metric=metric,
        operator=operator if metric != NO_DATA else None,
        threshold=(
            float(threshold) if metric != NO_DATA and isinstance(threshold, int | float) else None
        ),
        for_seconds=body.get("for_seconds", 0),
        devices=body.get("devices", []),
        webhook_url=url,
        muted=body.get("muted", False),
        include_calibrating=body.get("include_calibrating", False),
    )


async def _parse_kind_rule(
    body: dict[str, Any], kind: str, webhooks_allowed: bool, targets: WebhookTargets | None
) -> NewRule:
    """A rule of an indoor-air kind: its parameters checked over the defaults."""
    errors = FieldErrors()
    errors.unknown(body, KIND_FIELDS)
    params = check_params(kind, body.get("params"), defaults(kind), errors)
    _check_common(body, errors)
    errors.raise_if_any(INVALID_RULE)
    url = body.get("webhook_url")
    if url is not None:
        await _check_webhook(url, webhooks_allowed, targets or WebhookTargets())
    name = str(body.get("name") or "").strip() or kind.replace("_", " ")
    return NewRule(
        name=name[:NAME_LIMIT],
        metric=None,
        operator=None,
        threshold=None,
        for_seconds=0,
        devices=body.get("devices", []),
        webhook_url=url,
        muted=body.get("muted", False),
        kind=kind,
        params=params,
        include_calibrating=body.get("include_calibrating", False),
    )


async def parse_rule_change(
    data: Any,
    stored: asyncpg.Record,
    webhooks_allowed: bool,
    targets: WebhookTargets | None = None,
) -> tuple[NewRule, bool]:
    """The rule ``stored`` with the fields of a change (any of ``RULE_FIELDS``) applied and
    checked as a new rule is, and whether it has a new webhook URL (which is checked; an
    unchanged one is kept as it is). ``webhook_url: null`` removes the webhook."""
    body = json_object(data, INVALID_RULE)
    errors = FieldErrors()
    kind = stored["kind"]
    fields = RULE_FIELDS if kind == THRESHOLD else KIND_FIELDS
    errors.unknown(body, fields)
    if "kind" in body and body["kind"] != kind:
        errors.add("kind", f"cannot be changed (this rule is {kind}); make a new rule")
    if kind != THRESHOLD and "params" in body and not isinstance(body["params"], dict):
        errors.add("params", "must be a JSON object")
    errors.raise_if_any(INVALID_RULE)
    merged = {f: stored[f] for f in fields if f != "params" and stored[f] is not None} | body
    if kind != THRESHOLD:
        merged["params"] = stored_params(stored["params"]) | (body.get("params") or {})
    url = merged.pop("webhook_url", None)
    rule = await parse_rule(merged, webhooks_allowed, targets)
    changed_url = url is not None and url != stored["webhook_url"]
    if changed_url:
        await _check_webhook(url, webhooks_allowed, targets or WebhookTargets())
    return msgspec.structs.replace(rule, webhook_url=url), changed_url


async def create_rule(
    conn: asyncpg.Connection, rule: NewRule, preset: str | None = None
) -> dict[str, Any]:
    """Store the rule (made from ``preset``, if one); a webhook secret is made for it and
    shown once."""
    rule_id = uuid.uuid4().hex[:16]
    secret = secrets.token_urlsafe(32) if rule.webhook_url else None
    await conn.execute(
        "INSERT INTO alert_rules (rule_id, name, metric, operator, threshold, for_seconds, "
        "devices, webhook_url, webhook_secret, created_at, muted, kind, params, "
        "include_calibrating, preset) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13::jsonb, $14, $15)",
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
        rule.muted,
        rule.kind,
        json.dumps(rule.params),
        rule.include_calibrating,
        preset,
    )
    return {
        "rule_id": rule_id,
        **_shown(rule),
        "preset": preset,
        "webhook_secret": secret,
    }


def _shown(rule: NewRule) -> dict[str, Any]:
    """A rule as the API shows it, with what its kind watches for in words."""
    shown = msgspec.structs.asdict(rule)
    if rule.kind != THRESHOLD:
        shown["condition"] = condition_text(rule.kind, rule.params)
    return shown


async def stored_rule(conn: asyncpg.Connection, rule_id: str) -> asyncpg.Record | None:
    """A rule in force, as stored; None when there is none (or it was deleted)."""
    return await conn.fetchrow(
        "SELECT * FROM alert_rules WHERE rule_id = $1 AND deleted_at IS NULL", rule_id
    )


def asks_anew(rule: NewRule, stored: asyncpg.Record) -> bool:
    """Whether a change makes the rule a new question (its condition, its devices, muting),
    so that its devices' states start again from ``ok``; a new name or webhook does not."""
    fields = (
        "metric",
        "operator",
        "threshold",
        "for_seconds",
        "devices",
        "muted",
        "include_calibrating",
    )
    if rule.params != stored_params(stored["params"]) and rule.kind != THRESHOLD:
        return True
    return any(getattr(rule, f) != stored[f] for f in fields)


async def update_rule(
    conn: asyncpg.Connection, rule_id: str, rule: NewRule, new_webhook: bool, anew: bool
) -> dict[str, Any]:
    """Store the changed rule; when it asks ``anew`` its devices' states start again from
    ``ok`` (those firing are recorded as resolved, without a notification). A new webhook URL
    gets a new secret, shown in this answer only, and muting drops the notifications still
    waiting."""
    secret = secrets.token_urlsafe(32) if new_webhook else None
    async with conn.transaction():
        await conn.execute(
            "UPDATE alert_rules SET name = $2, metric = $3, operator = $4, threshold = $5, "
            "for_seconds = $6, devices = $7, webhook_url = $8, muted = $9, "
            "webhook_secret = CASE WHEN $8::text IS NULL THEN NULL "
            "WHEN $10::text IS NOT NULL THEN $10 ELSE webhook_secret END, "
            "params = $11::jsonb, include_calibrating = $12 "
            "WHERE rule_id = $1",
            rule_id,
            rule.name,
            rule.metric,
            rule.operator,
            rule.threshold,
            rule.for_seconds,
            rule.devices,
            rule.webhook_url,
            rule.muted,
            secret,
            json.dumps(rule.params),
            rule.include_calibrating,
        )
        if anew:
            # What was firing is closed in the history, so nothing stays "firing" for ever.
            await conn.execute(
                "INSERT INTO alert_history (rule_id, device_id, event, at, value, message) "
                "SELECT rule_id, device_id, 'resolved', now(), value, "
                "$2 || ': the rule was changed or muted; on device ' || device_id || ' resolved' "
                "FROM alert_states WHERE rule_id = $1 AND state = 'firing'",
                rule_id,
                rule.name,
            )
            await conn.execute("DELETE FROM alert_states WHERE rule_id = $1", rule_id)
            await conn.execute("DELETE FROM alert_windows WHERE rule_id = $1", rule_id)
        if rule.muted:
            await conn.execute(
                "DELETE FROM webhook_deliveries WHERE rule_id = $1 AND delivered_at IS NULL",
                rule_id,
            )
    answer = {"rule_id": rule_id, **_shown(rule)}
    if new_webhook:
        answer["webhook_secret"] = secret
    return answer


async def rules_with_states(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """The rules in force (without their secrets), each with every device's state under it."""
    rules = await conn.fetch(
        "SELECT rule_id, name, metric, operator, threshold, for_seconds, devices, "
        "webhook_url, muted, created_at, kind, params, include_calibrating, preset "
        "FROM alert_rules WHERE deleted_at IS NULL ORDER BY created_at"
    )
    states = await conn.fetch("SELECT * FROM alert_states")
    by_rule: dict[str, list[dict[str, Any]]] = {}
    for state in states:
        by_rule.setdefault(state["rule_id"], []).append(dict(state))
    listed = []
    for r in rules:
        shown = {
            **dict(r),
            "params": stored_params(r["params"]),
            "states": by_rule.get(r["rule_id"], []),
        }
        if r["kind"] != THRESHOLD:
            shown["params"] = defaults(r["kind"]) | shown["params"]
            shown["condition"] = condition_text(r["kind"], shown["params"])
        listed.append(shown)
    return listed


async def delete_rule(conn: asyncpg.Connection, rule_id: str) -> bool:
    """Stop evaluating a rule (its history stays); False when there is no such rule."""
    done = await conn.execute(
        "UPDATE alert_rules SET deleted_at = now() WHERE rule_id = $1 AND deleted_at IS NULL",
        rule_id,
    )
    await conn.execute("DELETE FROM alert_states WHERE rule_id = $1", rule_id)
    await conn.execute("DELETE FROM alert_windows WHERE rule_id = $1", rule_id)
    return not done.endswith(" 0")
