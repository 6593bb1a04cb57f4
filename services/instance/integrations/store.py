"""Integrations as a customer asks for them: checked, stored, listed, changed and deleted.

An integration is ``{name, url, kinds}``: where to POST (an http(s) URL leading only to
addresses webhooks may reach, ``webhook_targets``) and what to send (``readings``, the readings
stored, and any of the kinds of ``integration_events``). The license must include webhooks.
A secret made for it signs every POST; it is shown once, in the answer to the creation (or to
a change of URL, or ``rotate_secret``). It is sent what happens from its creation on; the past
comes through backfills. Names are unique among the integrations in force, so a creation
retried after a lost answer is refused (409) instead of making a second one.
"""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from libs.http.errors import Conflict
from libs.http.validation import FieldErrors, json_object
from services.instance import integration_events
from services.instance.webhook_targets import WebhookRefused, WebhookTargets

READINGS = "readings"
KINDS = (READINGS, *integration_events.KINDS)
FIELDS = ("name", "url", "kinds")
CHANGE_FIELDS = (*FIELDS, "rotate_secret")
NAME_LIMIT = 100
MAX_URL_LENGTH = 2048
MAX_INTEGRATIONS = 20
INVALID = "invalid integration"
# What the routes show of an integration (never its secret).
SHOWN = (
    "integration_id, name, url, kinds, created_at, failures, next_at, last_error, "
    "failing_since, delivered_at"
)
# Where nothing committed before can be missed (see migration 012): the oldest transaction
# still running.
NOW_POSITION = "pg_snapshot_xmin(pg_current_snapshot())"


class WebhooksNotLicensed(Exception):
    """The license does not include webhooks, which integrations are."""


class NewIntegration(msgspec.Struct, frozen=True, kw_only=True):
    """An integration as it was asked for, checked, not stored yet."""

    name: str
    url: str
    kinds: list[str]


def _check_kinds(value: Any, errors: FieldErrors) -> list[str]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(k, str) and k in KINDS for k in value)
    ):
        errors.add("kinds", f"must be a non-empty list of: {', '.join(KINDS)}")
        return []
    return list(dict.fromkeys(value))


async def _check_url(value: Any, errors: FieldErrors, targets: WebhookTargets) -> str:
    if not isinstance(value, str) or not value.startswith(("https://", "http://")):
        errors.add("url", "must be an http(s) URL")
    elif len(value) > MAX_URL_LENGTH:
        errors.add("url", f"must be at most {MAX_URL_LENGTH} characters")
    else:
        try:
            await targets.resolve(value)
        except WebhookRefused as exc:
            errors.add("url", str(exc))
        else:
            return value
    return ""


async def parse_integration(
    data: Any, webhooks_allowed: bool, targets: WebhookTargets, *, fields: tuple[str, ...] = FIELDS
) -> NewIntegration:
    """An integration from a request body, or a 400 naming each bad field;
    ``WebhooksNotLicensed`` when the license does not include webhooks. The URL's host is
    resolved only once the rest is right (it may take seconds)."""
    if not webhooks_allowed:
        raise WebhooksNotLicensed("the license does not include webhooks (integrations)")
    body = json_object(data, INVALID)
    errors = FieldErrors()
    errors.unknown(body, fields)
    name = errors.text(body, "name", required=True, limit=NAME_LIMIT)
    kinds = _check_kinds(body.get("kinds"), errors)
    if "url" not in body:
        errors.add("url", "is required")
    errors.raise_if_any(INVALID)
    url = await _check_url(body["url"], errors, targets)
    errors.raise_if_any(INVALID)
    return NewIntegration(name=name or "", url=url, kinds=kinds)


async def parse_change(
    data: Any, stored: asyncpg.Record, webhooks_allowed: bool, targets: WebhookTargets
) -> tuple[NewIntegration, bool]:
    """The stored integration with a change's fields applied and checked as a new one is, and
    whether it gets a new secret (a new URL, or ``rotate_secret: true``)."""
    body = json_object(data, INVALID)
    errors = FieldErrors()
    errors.unknown(body, CHANGE_FIELDS)
    rotate = body.pop("rotate_secret", False)
    if not isinstance(rotate, bool):
        errors.add("rotate_secret", "must be true or false")
    errors.raise_if_any(INVALID)
    merged = {"name": stored["name"], "url": stored["url"], "kinds": list(stored["kinds"])} | body
    changed = await parse_integration(merged, webhooks_allowed, targets)
    return changed, rotate or changed.url != stored["url"]


async def create_integration(
    conn: asyncpg.Connection, new: NewIntegration, now: datetime
) -> dict[str, Any]:
    """Store the integration, sent what happens from now on; its secret is in this answer
    only. ``Conflict`` for a name in use or one integration too many."""
    integration_id = uuid.uuid4().hex[:16]
    secret = secrets.token_urlsafe(32)
    async with conn.transaction():
        await _one_change_at_a_time(conn)
        count = await conn.fetchval("SELECT count(*) FROM integrations WHERE deleted_at IS NULL")
        if count >= MAX_INTEGRATIONS:
            raise Conflict(
                f"an instance has at most {MAX_INTEGRATIONS} integrations; delete one first"
            )
        await _name_free(conn, new.name, None)
        await conn.execute(
            "INSERT INTO integrations (integration_id, name, url, kinds, secret, created_at, "
            f"events_xid, readings_xid, next_at) VALUES ($1, $2, $3, $4, $5, $6, "
            f"{NOW_POSITION}, {NOW_POSITION}, $6)",
            integration_id,
            new.name,
            new.url,
            new.kinds,
            secret,
            now,
        )
        await readings_noted_while_taken(conn)
        row = await integration_of(conn, integration_id)
    assert row is not None
    return {**shown(row), "secret": secret}


async def _one_change_at_a_time(conn: asyncpg.Connection) -> None:
    """Changes of integrations wait for each other (within the caller's transaction), so each
    sees the others' outcome: the limit's count, the names, whether readings are taken."""
    await conn.execute("LOCK TABLE integrations IN SHARE ROW EXCLUSIVE MODE")


async def readings_noted_while_taken(conn: asyncpg.Connection) -> None:
    """Ingest notes the readings it stores for integrations (``reading_batches``) only while
    one takes them: the trigger is enabled in the transaction that makes one take them, and
    disabled in the one that makes none (it costs ingest about a tenth otherwise; measured by
    ``just bench integrations``)."""
    taken = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM integrations WHERE deleted_at IS NULL AND $1 = ANY (kinds))",
        READINGS,
    )
    enabled = await conn.fetchval(
        "SELECT tgenabled <> 'D' FROM pg_trigger "
        "WHERE tgrelid = 'readings'::regclass AND tgname = 'readings_for_integrations'"
    )
    if taken != enabled:
        change = "ENABLE" if taken else "DISABLE"
        await conn.execute(f"ALTER TABLE readings {change} TRIGGER readings_for_integrations")


async def _name_free(conn: asyncpg.Connection, name: str, but: str | None) -> None:
    taken = await conn.fetchval(
        "SELECT integration_id FROM integrations WHERE deleted_at IS NULL AND name = $1 "
        "AND integration_id IS DISTINCT FROM $2",
        name,
        but,
    )
    if taken is not None:
        raise Conflict(
            f"an integration named {name!r} exists ({taken})",
            fields=[{"field": "name", "reason": "is taken by another integration"}],
        )


async def update_integration(
    conn: asyncpg.Connection, integration_id: str, new: NewIntegration, new_secret: bool
) -> dict[str, Any] | None:
    """Store the change (None when the integration is gone). Readings newly subscribed to are
    sent from now on, not from where the integration stood; a new secret is in this answer
    only."""
    secret = secrets.token_urlsafe(32) if new_secret else None
    async with conn.transaction():
        await _one_change_at_a_time(conn)
        await _name_free(conn, new.name, integration_id)
        done = await conn.execute(
            "UPDATE integrations SET name = $2, url = $3, "
            "secret = coalesce($5, secret), "
            f"readings_xid = CASE WHEN $6 = ANY(kinds) THEN readings_xid ELSE {NOW_POSITION} END, "
            "readings_id = CASE WHEN $6 = ANY(kinds) THEN readings_id ELSE 0 END, "
            "readings_n = CASE WHEN $6 = ANY(kinds) THEN readings_n ELSE 0 END, "
            "kinds = $4, failures = 0, next_at = now() "
            "WHERE integration_id = $1 AND deleted_at IS NULL",
            integration_id,
            new.name,
            new.url,
            new.kinds,
            secret,
            READINGS,
        )
        if done.endswith(" 0"):
            return None
        await readings_noted_while_taken(conn)
        row = await integration_of(conn, integration_id)
    assert row is not None
    answer = shown(row)
    if secret is not None:
        answer["secret"] = secret
    return answer


async def delete_integration(conn: asyncpg.Connection, integration_id: str, now: datetime) -> bool:
    """Stop sending to it (its backfills are cancelled); False when there is none."""
    async with conn.transaction():
        await _one_change_at_a_time(conn)
        done = await conn.execute(
            "UPDATE integrations SET deleted_at = $2 "
            "WHERE integration_id = $1 AND deleted_at IS NULL",
            integration_id,
            now,
        )
        await conn.execute(
            "UPDATE integration_backfills SET state = 'cancelled', finished_at = $2 "
            "WHERE integration_id = $1 AND state IN ('queued', 'running')",
            integration_id,
            now,
        )
        await readings_noted_while_taken(conn)
    return not done.endswith(" 0")


async def integration_of(conn: asyncpg.Connection, integration_id: str) -> asyncpg.Record | None:
    """An integration in force, as the routes show it; None when there is none."""
    return await conn.fetchrow(
        f"SELECT {SHOWN} FROM integrations WHERE integration_id = $1 AND deleted_at IS NULL",
        integration_id,
    )


async def stored_integration(
    conn: asyncpg.Connection, integration_id: str
) -> asyncpg.Record | None:
    """An integration in force with what a change is merged into; None when there is none."""
    return await conn.fetchrow(
        "SELECT name, url, kinds FROM integrations "
        "WHERE integration_id = $1 AND deleted_at IS NULL",
        integration_id,
    )


async def list_integrations(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """The integrations in force (without their secrets), oldest first."""
    rows = await conn.fetch(
        f"SELECT {SHOWN} FROM integrations WHERE deleted_at IS NULL ORDER BY created_at"
    )
    return [shown(r) for r in rows]


def shown(row: asyncpg.Record) -> dict[str, Any]:
    """An integration as the API shows it: what it is, and how its delivery goes."""
    return {
        "integration_id": row["integration_id"],
        "name": row["name"],
        "url": row["url"],
        "kinds": list(row["kinds"]),
        "created_at": row["created_at"],
        "delivery": {
            "state": "failing" if row["failures"] else "ok",
            "failures": row["failures"],
            "last_error": row["last_error"],
            "failing_since": row["failing_since"],
            "next_attempt_at": row["next_at"] if row["failures"] else None,
            "delivered_at": row["delivered_at"],
        },
    }
