"""Which sessions licensing still honours, from the log.

Session tokens are checked by signature and expiry (``libs/http/auth.py``); that alone would let
a stolen or old session read a customer's license for up to an hour after a password reset or a
closure. So licensing projects signup's ``CredentialsChanged`` and ``CustomerClosed`` into
``account_access`` and refuses, with the same 401 as an expired session, a token issued before
the customer's latest cut-off or of a closed account. (Revoking a closed account's license is
the license reactor's, which keeps its own state: ``reactors.py``.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from litestar.connection import ASGIConnection

from contracts import CredentialsChanged, CustomerClosed
from libs.db.postgres import Connection
from libs.http.auth import Caller, SessionTokens, bearer, is_admin, issued_before, session_refused
from libs.projections.apply import Projection, Recorded


async def when_credentials_changed_cut_off_sessions(
    conn: Connection, r: Recorded[CredentialsChanged]
) -> None:
    # GREATEST: an older change delivered late never reopens what a newer one cut off.
    await conn.execute(
        "INSERT INTO account_access (customer_id, sessions_valid_from) VALUES ($1, $2) "
        "ON CONFLICT (customer_id) DO UPDATE SET sessions_valid_from = "
        "GREATEST(account_access.sessions_valid_from, EXCLUDED.sessions_valid_from)",
        r.event.customer_id,
        r.event.sessions_valid_from,
    )


async def when_customer_closed_record_it(conn: Connection, r: Recorded[CustomerClosed]) -> None:
    # The first closure's time stays: closing again changes nothing.
    await conn.execute(
        "INSERT INTO account_access (customer_id, closed_at) VALUES ($1, $2) "
        "ON CONFLICT (customer_id) DO UPDATE SET "
        "closed_at = COALESCE(account_access.closed_at, EXCLUDED.closed_at)",
        r.event.customer_id,
        r.envelope.occurred_at,
    )


ACCOUNT_ACCESS = Projection(
    name="account_access",
    tables=("account_access",),
    handlers={
        CredentialsChanged: when_credentials_changed_cut_off_sessions,
        CustomerClosed: when_customer_closed_record_it,
    },
)


async def session_holds(pool: asyncpg.Pool, customer_id: str, token: str) -> bool:
    """Whether a session token (signature and expiry already checked) of ``customer_id`` still
    holds: not issued before their latest credentials change, and their account not closed."""
    row = await pool.fetchrow(
        "SELECT sessions_valid_from, closed_at FROM account_access WHERE customer_id = $1",
        customer_id,
    )
    if row is None:
        return True
    return row["closed_at"] is None and not issued_before(token, row["sessions_valid_from"])


@dataclass(frozen=True)
class CustomerSessions:
    """Session tokens as licensing honours them: valid, and still holding (``session_holds``)."""

    tokens: SessionTokens
    pool: Callable[[], asyncpg.Pool]

    async def customer_of(self, token: str | None) -> str | None:
        """The customer a session token names, if licensing still honours it."""
        customer_id = self.tokens.customer_of(token)
        if customer_id is None or token is None:
            return None
        return customer_id if await session_holds(self.pool(), customer_id, token) else None

    async def caller(
        self, connection: ASGIConnection[Any, Any, Any, Any], admin_token: str | None
    ) -> Caller:
        """The admin, or the customer whose session licensing honours; 401 for anyone else."""
        token = bearer(connection)
        if is_admin(token, admin_token):
            return Caller(kind="admin")
        customer_id = await self.customer_of(token)
        if customer_id is None:
            raise session_refused()
        return Caller(kind="customer", customer_id=customer_id)
