"""Provisioning keys: what lets the customer's devices register themselves (fleet provisioning).

A key is made here and shown once (``iotpk_`` and 43 URL-safe characters, 256 random bits);
the database keeps only its sha256, which is enough for a key that random (nothing to guess, so
no slow hash is needed) and lets a registration find its key by an index. A key may expire and
may allow a number of uses; revoking it stops new registrations at once and leaves the devices
registered with it as they are. The audit trail of registrations and key exchanges names a
key by its id, never by the key.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from libs.http.errors import NotFound
from libs.http.validation import FieldErrors, json_object

KEY_PREFIX = "iotpk_"
NAME_LIMIT = 100
MAX_USES_LIMIT = 100_000
AUDIT_LIMIT = 1000
NOTE = "the key is shown only once; store it where your devices are prepared"


def key_hash(key: str) -> bytes:
    """What the database keeps of a key (and looks it up by)."""
    return hashlib.sha256(key.encode()).digest()


def looks_like_key(key: str) -> bool:
    """Whether ``key`` has a provisioning key's shape (anything else is not looked up)."""
    return key.startswith(KEY_PREFIX) and 16 <= len(key) <= 128


@dataclass(frozen=True)
class NewKey:
    """What a new key is made of, as the customer asked."""

    name: str
    expires_at: datetime | None
    max_uses: int | None


def new_key_request(data: Any, now: datetime) -> NewKey:
    """A new key's ``name`` (1..100), ``expires_at`` (RFC 3339 with an offset, in the future)
    and ``max_uses`` (1..100000), or a 400 naming every bad field."""
    body = json_object(data)
    errors = FieldErrors()
    errors.unknown(body, ("name", "expires_at", "max_uses"))
    name = errors.text(body, "name", required=True, limit=NAME_LIMIT)
    expires_at = _expiry(body.get("expires_at"), now, errors)
    max_uses = body.get("max_uses")
    if max_uses is not None and (
        not isinstance(max_uses, int)
        or isinstance(max_uses, bool)
        or not 1 <= max_uses <= MAX_USES_LIMIT
    ):
        errors.add("max_uses", f"must be a whole number from 1 to {MAX_USES_LIMIT}")
        max_uses = None
    errors.raise_if_any()
    return NewKey(str(name), expires_at, max_uses)


def _expiry(value: Any, now: datetime, errors: FieldErrors) -> datetime | None:
    if value is None:
        return None
    reason = "must be an RFC 3339 time with an offset, such as 2030-01-31T12:00:00Z"
    if not isinstance(value, str) or len(value) > 64:
        errors.add("expires_at", reason)
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        errors.add("expires_at", reason)
        return None
    if when.tzinfo is None or "T" not in value.upper():
        errors.add("expires_at", reason)
        return None
    if when <= now:
        errors.add("expires_at", "must be in the future")
        return None
    return when.astimezone(UTC)


def key_state(row: asyncpg.Record | dict[str, Any], now: datetime) -> str:
    """``active``, ``expired``, ``used up`` or ``revoked``; the first that applies of revoked,
    expired and used up wins."""
    if row["revoked_at"] is not None:
        return "revoked"
    if row["expires_at"] is not None and row["expires_at"] <= now:
        return "expired"
    if row["max_uses"] is not None and row["uses"] >= row["max_uses"]:
        return "used up"
    return "active"


def key_view(row: asyncpg.Record | dict[str, Any], now: datetime) -> dict[str, Any]:
    """A key as the customer sees it (never the key itself)."""
    view = {
        "key_id": row["key_id"],
        "name": row["name"],
        "created_at": row["created_at"],
        "expires_at": row["expires_at"],
        "max_uses": row["max_uses"],
        "uses": row["uses"],
        "revoked_at": row["revoked_at"],
        "state": key_state(row, now),
    }
    if "devices" in row:
        view["devices"] = row["devices"]
    return view


async def create_key(conn: asyncpg.Connection, new: NewKey, now: datetime) -> dict[str, Any]:
    """A new key; the answer holds the key, which is kept nowhere."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = await conn.fetchrow(
        "INSERT INTO provisioning_keys (key_id, name, key_hash, created_at, expires_at, max_uses)"
        " VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
        f"pk_{secrets.token_hex(8)}",
        new.name,
        key_hash(key),
        now,
        new.expires_at,
        new.max_uses,
    )
    assert row is not None
    return {**key_view(row, now), "key": key, "note": NOTE}


async def list_keys(conn: asyncpg.Connection, now: datetime) -> list[dict[str, Any]]:
    """Every key, newest first, with how many active devices registered with it."""
    rows = await conn.fetch(
        """
        SELECT k.*, (SELECT count(*) FROM devices d
                     WHERE d.provisioning_key_id = k.key_id AND d.deleted_at IS NULL) AS devices
        FROM provisioning_keys k ORDER BY k.created_at DESC, k.key_id
        """
    )
    return [key_view(dict(r), now) for r in rows]


async def revoke_key(conn: asyncpg.Connection, key_id: str, now: datetime) -> None:
    """The key registers nothing more (already revoked: nothing changes); ``NotFound`` when
    there is no such key."""
    found = await conn.fetchval(
        "UPDATE provisioning_keys SET revoked_at = coalesce(revoked_at, $2) "
        "WHERE key_id = $1 RETURNING key_id",
        key_id[:64],
        now,
    )
    if found is None:
        raise NotFound(f"no provisioning key {key_id[:64]}")


def audit_limit(value: Any) -> int:
    """The ``limit`` of the audit list (1..1000, default 100), or a 400."""
    if value is None:
        return 100
    try:
        limit = int(str(value))
    except ValueError:
        limit = 0
    if not 1 <= limit <= AUDIT_LIMIT:
        errors = FieldErrors()
        errors.add("limit", f"must be a whole number from 1 to {AUDIT_LIMIT}")
        errors.raise_if_any()
    return limit


async def audit_entries(conn: asyncpg.Connection, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` registrations and key exchanges, accepted or refused."""
    rows = await conn.fetch(
        "SELECT at, action, outcome, reason, address, key_id, uuid FROM registration_audit "
        "ORDER BY at DESC, id DESC LIMIT $1",
        limit,
    )
    return [dict(r) for r in rows]
