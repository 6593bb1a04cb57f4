"""Licenses and license history, projected from the licenses the log records."""

from __future__ import annotations

import msgspec

from contracts import LicenseIssued, LicenseRevoked
from libs.db.postgres import Connection
from libs.eventlog.decisions import cause_json
from libs.projections.apply import Projection, Recorded


async def when_license_issued_record_it(conn: Connection, r: Recorded[LicenseIssued]) -> None:
    e = r.event
    await conn.execute(
        """
        INSERT INTO licenses (license_id, customer_id, plan, kid, license_type, issued_at,
                              expires_at, grace_until, features, limits, jwt, cause)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10::jsonb, $11, $12::jsonb)
        ON CONFLICT (license_id) DO NOTHING
        """,
        e.license_id,
        e.customer_id,
        e.plan,
        e.kid,
        e.license_type,
        e.issued_at,
        e.expires_at,
        e.grace_until,
        msgspec.json.encode(e.features).decode(),
        msgspec.json.encode(e.limits).decode(),
        e.jwt,
        # What renewing this license will be decided on (renewals.py).
        cause_json(r.envelope),
    )
    await _history(conn, r, e.license_id, "issued", e.license_type, e.plan, e.issued_by, e.reason)


async def when_license_revoked_record_it(conn: Connection, r: Recorded[LicenseRevoked]) -> None:
    e = r.event
    await conn.execute(
        "UPDATE licenses SET revoked_at = $2, revoked_reason = $3 WHERE license_id = $1",
        e.license_id,
        r.envelope.occurred_at,
        e.reason,
    )
    await _history(conn, r, e.license_id, "revoked", None, None, e.revoked_by, e.reason)


async def _history(
    conn: Connection,
    r: Recorded[LicenseIssued] | Recorded[LicenseRevoked],
    license_id: str,
    action: str,
    license_type: str | None,
    plan: str | None,
    actor: str,
    reason: str | None,
) -> None:
    await conn.execute(
        """
        INSERT INTO license_history (seq, customer_id, license_id, action, license_type, plan,
                                     actor, reason, at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        """,
        r.seq,
        r.event.customer_id,
        license_id,
        action,
        license_type,
        plan,
        actor,
        reason,
        r.envelope.occurred_at,
    )


LICENSES = Projection(
    name="licenses",
    tables=("licenses", "license_history"),
    handlers={
        LicenseIssued: when_license_issued_record_it,
        LicenseRevoked: when_license_revoked_record_it,
    },
)
