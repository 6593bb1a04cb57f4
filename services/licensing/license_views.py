"""What licensing's API shows of its read model: a customer's newest license and its history."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
import msgspec

HISTORY_FIELDS = ("license_id", "action", "license_type", "plan", "actor", "reason", "at")


def license_status(
    expires_at: datetime, grace_until: datetime | None, revoked: bool, now: datetime
) -> str:
    """Where a license stands ``now``: revoked, active, in grace, or expired."""
    if revoked:
        return "revoked"
    if expires_at > now:
        return "active"
    return "grace" if grace_until is not None and grace_until > now else "expired"


def license_view(row: asyncpg.Record, now: datetime) -> dict[str, Any]:
    """A ``licenses`` row as the API shows it, with its status at ``now``."""
    return {
        "license_id": row["license_id"],
        "customer_id": row["customer_id"],
        "plan": row["plan"],
        "status": license_status(
            row["expires_at"], row["grace_until"], bool(row["revoked_at"]), now
        ),
        "license_type": row["license_type"],
        "kid": row["kid"],
        "issued_at": row["issued_at"],
        "expires_at": row["expires_at"],
        "grace_until": row["grace_until"],
        "features": msgspec.json.decode(row["features"]),
        "limits": msgspec.json.decode(row["limits"]),
        "jwt": row["jwt"],
    }


async def newest_license(
    pool: asyncpg.Pool, customer_id: str, now: datetime
) -> dict[str, Any] | None:
    """The customer's newest license, if there is one: a revoked one (a closed account's)
    shows as ``revoked``, never an older one in its place."""
    row = await pool.fetchrow(
        "SELECT * FROM licenses WHERE customer_id = $1 ORDER BY issued_at DESC, license_id LIMIT 1",
        customer_id,
    )
    return None if row is None else license_view(row, now)


async def license_history(pool: asyncpg.Pool, customer_id: str) -> list[dict[str, Any]]:
    """Every license issued or revoked for the customer, oldest first, with who and why."""
    rows = await pool.fetch(
        "SELECT * FROM license_history WHERE customer_id = $1 ORDER BY seq", customer_id
    )
    return [{k: r[k] for k in HISTORY_FIELDS} for r in rows]


async def is_revoked(pool: asyncpg.Pool, license_id: str) -> bool:
    """Whether licensing has recorded the license as revoked."""
    return bool(
        await pool.fetchval(
            "SELECT revoked_at IS NOT NULL FROM licenses WHERE license_id = $1", license_id
        )
    )
