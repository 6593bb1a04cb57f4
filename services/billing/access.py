"""Which sessions billing still honours, and which accounts are closed, from the log.

Session tokens are checked by signature and expiry (``libs/http/auth.py``); that alone would let
a stolen or old session reach a customer's billing for up to an hour after a password reset or a
closure. So billing projects signup's ``CredentialsChanged`` and ``CustomerClosed`` into
``account_access`` and refuses, with the same 401 as an expired session, a token issued before
the customer's latest cut-off or of a closed account. The trial scheduler and checkout read the
same table to leave a closed account alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from litestar.connection import ASGIConnection

from contracts import CredentialsChanged, CustomerClosed
from libs.db.postgres import Connection
from libs.http.auth import SessionTokens, bearer, issued_before, session_refused
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


async def is_closed(pool: asyncpg.Pool | Connection, customer_id: str) -> bool:
    """Whether billing has seen the customer's account closed."""
    return bool(
        await pool.fetchval(
            "SELECT closed_at IS NOT NULL FROM account_access WHERE customer_id = $1", customer_id
        )
    )


@dataclass(frozen=True)
class CustomerSessions:
    """Session tokens as billing honours them: valid, and still holding (``session_holds``)."""

    tokens: SessionTokens
    pool: Callable[[], asyncpg.Pool]

    async def customer_of(self, token: str | None) -> str | None:
        """The customer a session token names, if billing still honours it."""
        customer_id = self.tokens.customer_of(token)
        if customer_id is None or token is None:
            return None
        return customer_id if await session_holds(self.pool(), customer_id, token) else None

    async def customer(self, connection: ASGIConnection[Any, Any, Any, Any]) -> str:
        """The customer of the request's bearer token if billing honours it; 401 otherwise."""
        customer_id = await self.customer_of(bearer(connection))
        if customer_id is None:
            raise session_refused()
        return customer_id
