"""Sessions a service still honours after the customer reset their password or closed their
account, from a table it keeps of its own.

Session tokens are checked by signature and expiry (``auth.SessionTokens``); that alone would
let a stolen or old session in for up to its lifetime after a password reset or a closure. A
service that serves customers keeps an ``account_access`` table (``customer_id`` primary key,
``sessions_valid_from`` and ``closed_at`` timestamps), filled from the log with
``cut_off_sessions`` and ``record_closure``, and checks tokens with ``HonouredSessions``: a
token issued before the customer's latest cut-off, or of a closed account, gets the same 401
as an expired one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from litestar.connection import ASGIConnection

from libs.db.postgres import Connection
from libs.http.auth import Caller, SessionTokens, bearer, is_admin, issued_before, session_refused


async def cut_off_sessions(conn: Connection, customer_id: str, valid_from: datetime) -> None:
    """Refuse the customer's sessions issued before ``valid_from`` (a later cut-off wins,
    whatever order they arrive in)."""
    await conn.execute(
        "INSERT INTO account_access (customer_id, sessions_valid_from) VALUES ($1, $2) "
        "ON CONFLICT (customer_id) DO UPDATE SET sessions_valid_from = "
        "GREATEST(account_access.sessions_valid_from, EXCLUDED.sessions_valid_from)",
        customer_id,
        valid_from,
    )


async def record_closure(conn: Connection, customer_id: str, at: datetime) -> None:
    """Refuse every session of the customer from now on (the first closure's time stays)."""
    await conn.execute(
        "INSERT INTO account_access (customer_id, closed_at) VALUES ($1, $2) "
        "ON CONFLICT (customer_id) DO UPDATE SET "
        "closed_at = COALESCE(account_access.closed_at, EXCLUDED.closed_at)",
        customer_id,
        at,
    )


async def session_holds(pool: asyncpg.Pool, customer_id: str, token: str) -> bool:
    """Whether a session token (signature and expiry already checked) of ``customer_id`` still
    holds: not issued before their latest cut-off, and their account not closed."""
    row = await pool.fetchrow(
        "SELECT sessions_valid_from, closed_at FROM account_access WHERE customer_id = $1",
        customer_id,
    )
    if row is None:
        return True
    return row["closed_at"] is None and not issued_before(token, row["sessions_valid_from"])


@dataclass(frozen=True)
class HonouredSessions:
    """Session tokens as this service honours them: valid, and still holding."""

    tokens: SessionTokens
    pool: Callable[[], asyncpg.Pool]

    async def customer_of(self, token: str | None) -> str | None:
        """The customer a session token names, if the service still honours it."""
        customer_id = self.tokens.customer_of(token)
        if customer_id is None or token is None:
            return None
        return customer_id if await session_holds(self.pool(), customer_id, token) else None

    async def customer(self, connection: ASGIConnection[Any, Any, Any, Any]) -> str:
        """The customer of the request's bearer token if honoured; 401 otherwise."""
        customer_id = await self.customer_of(bearer(connection))
        if customer_id is None:
            raise session_refused()
        return customer_id

    async def caller(
        self, connection: ASGIConnection[Any, Any, Any, Any], admin_token: str | None
    ) -> Caller:
        """The admin, or the customer whose session is honoured; 401 for anyone else."""
        token = bearer(connection)
        if is_admin(token, admin_token):
            return Caller(kind="admin")
        customer_id = await self.customer_of(token)
        if customer_id is None:
            raise session_refused()
        return Caller(kind="customer", customer_id=customer_id)
