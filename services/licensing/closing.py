"""A closed account's license: revoked once, and no license issued for the account after.

The license reactor (``reactors.py``) reads ``CustomerClosed`` and ``LicenseIssued`` in log
order with its other events and keeps, in ``license_plans`` and in its own transaction, which
license is the customer's current one and when the account closed; so what it decides never
waits on a read model. On the closure it revokes the current license (``LicenseRevoked``); a
license issued before the closure that reaches the log after it (the outbox relays it a moment
later) is revoked as it arrives; a second ``CustomerClosed`` finds the account closed already
and appends nothing. Each revocation's id is derived from the license it revokes, so however
often and by whichever path it is decided, it is stored once.
"""

from __future__ import annotations

import uuid

from contracts import CustomerClosed, LicenseIssued, LicenseRevoked
from libs.db.postgres import Connection
from libs.projections.apply import Recorded
from libs.runtime.outbox import add_to_outbox

REASON = "account closed"


async def is_closed(conn: Connection, customer_id: str) -> bool:
    """Whether the license reactor has seen the customer's account closed."""
    return bool(
        await conn.fetchval(
            "SELECT closed_at IS NOT NULL FROM license_plans WHERE customer_id = $1", customer_id
        )
    )


def license_revoked_id(license_id: str) -> str:
    """The id of the LicenseRevoked that revokes ``license_id``: one per license."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"license-revoked:{license_id}"))


async def revoke(
    conn: Connection, r: Recorded[CustomerClosed] | Recorded[LicenseIssued], license_id: str
) -> None:
    """Put the LicenseRevoked of ``license_id`` into the outbox (once per license)."""
    customer_id = r.event.customer_id
    await add_to_outbox(
        conn,
        LicenseRevoked(customer_id=customer_id, license_id=license_id, reason=REASON),
        customer_id=customer_id,
        causation=r.envelope,
        event_id=license_revoked_id(license_id),
    )


async def when_customer_closed_revoke_license(
    conn: Connection, r: Recorded[CustomerClosed]
) -> None:
    """Revoke the customer's current license, on the first closure only."""
    customer_id = r.event.customer_id
    row = await conn.fetchrow(
        """
        INSERT INTO license_plans (customer_id, plan, closed_at) VALUES ($1, 'starter', $2)
        ON CONFLICT (customer_id) DO UPDATE SET closed_at = EXCLUDED.closed_at
        WHERE license_plans.closed_at IS NULL
        RETURNING current_license_id
        """,
        customer_id,
        r.envelope.occurred_at,
    )
    if row is None:
        return  # closed before: its license was revoked then
    license_id = row["current_license_id"] or await _newest_license(conn, customer_id)
    if license_id is not None:
        await revoke(conn, r, license_id)


async def _newest_license(conn: Connection, customer_id: str) -> str | None:
    # Only for licenses issued before the reactor tracked the current one (migration 006):
    # the licenses read model's newest unrevoked license.
    value = await conn.fetchval(
        "SELECT license_id FROM licenses WHERE customer_id = $1 AND revoked_at IS NULL "
        "ORDER BY issued_at DESC, license_id LIMIT 1",
        customer_id,
    )
    return None if value is None else str(value)


async def when_license_issued_track_it(conn: Connection, r: Recorded[LicenseIssued]) -> None:
    """The customer's current license is the last issued; one issued to a closed account
    (decided before the closure, on the log after it) is revoked at once."""
    closed_at = await conn.fetchval(
        "UPDATE license_plans SET current_license_id = $2 WHERE customer_id = $1 "
        "RETURNING closed_at",
        r.event.customer_id,
        r.event.license_id,
    )
    if closed_at is not None:
        await revoke(conn, r, r.event.license_id)
