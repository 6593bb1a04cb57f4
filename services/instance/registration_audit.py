"""The audit trail of fleet registrations and key exchanges, and the limit on failed ones.

Every attempt, accepted or refused, is a row of ``registration_audit`` with the caller's address
and the provisioning key's id (never a key). Refused ones count against the address (an IPv6
address per /64) in a window of ten minutes: at 20, the address is answered 429 until the
window ends. A refusal for the license's device limit or an unavailable broker is not the
caller's doing and does not count.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg

from libs.http.app import address_subject
from libs.http.errors import DomainError, Forbidden, TooManyRequests, UpstreamError
from services.instance import fleet

MAX_FAILURES, FAILURE_WINDOW_SECONDS = 20, 600


@dataclass
class Attempt:
    """One registration or key exchange, as the audit trail records it."""

    action: str
    address: str
    key_id: str | None = None
    uuid: str | None = None


async def audit(
    conn: asyncpg.Connection, attempt: Attempt, outcome: str, reason: str | None
) -> None:
    """One row of the audit trail."""
    await conn.execute(
        "INSERT INTO registration_audit (at, action, outcome, reason, address, key_id, uuid) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7)",
        datetime.now(UTC),
        attempt.action,
        outcome,
        reason[:200] if reason else None,
        attempt.address[:64],
        attempt.key_id,
        attempt.uuid if attempt.uuid and fleet.valid_uuid(attempt.uuid) else None,
    )


async def refuse_if_limited(conn: asyncpg.Connection, address: str) -> None:
    """429, until the window ends, for an address with too many failures in it."""
    row = await conn.fetchrow(
        "SELECT failures, ceil(extract(epoch FROM window_started_at "
        "+ make_interval(secs => $2) - clock_timestamp()))::int AS retry_after "
        "FROM registration_failures WHERE subject = $1",
        address_subject(address),
        float(FAILURE_WINDOW_SECONDS),
    )
    if row is not None and row["failures"] >= MAX_FAILURES and row["retry_after"] > 0:
        raise TooManyRequests(
            "too many failed registrations from this address; try again later",
            row["retry_after"],
        )


async def count_failure(conn: asyncpg.Connection, address: str) -> None:
    """One more failure of the address in its window (a window that ended starts again)."""
    await conn.execute(
        """
        INSERT INTO registration_failures AS f (subject, window_started_at, failures)
        VALUES ($1, now(), 1)
        ON CONFLICT (subject) DO UPDATE SET
            failures = CASE WHEN f.window_started_at < now() - make_interval(secs => $2)
                            THEN 1 ELSE f.failures + 1 END,
            window_started_at = CASE WHEN f.window_started_at < now() - make_interval(secs => $2)
                                     THEN now() ELSE f.window_started_at END
        """,
        address_subject(address),
        float(FAILURE_WINDOW_SECONDS),
    )


class LicenseFull(Forbidden):
    """The license's ``maxDevices`` are all taken: the customer's limit, not the caller's
    fault."""


def counts_as_failure(exc: DomainError) -> bool:
    """Refusals for what the caller sent (not the license's limit or the broker) count
    against its address."""
    return not isinstance(exc, UpstreamError | LicenseFull)


async def forget_old_attempts(conn: asyncpg.Connection, keep_days: int) -> None:
    """Drop audit rows older than the license's data retention, and failure windows that
    ended (what a flood of attempts from many addresses left behind)."""
    await conn.execute(
        "DELETE FROM registration_audit WHERE at < now() - make_interval(days => $1)", keep_days
    )
    await conn.execute(
        "DELETE FROM registration_failures "
        "WHERE window_started_at < now() - make_interval(secs => $1)",
        float(FAILURE_WINDOW_SECONDS),
    )
