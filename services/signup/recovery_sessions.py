"""Which session tokens signup still honours: not those issued before the customer's password
was reset, nor those of a closed account.

Session tokens are stateless HS256 JWTs (``libs/http/auth.py``); signup, which issued them,
also checks them against the customer's credential row: its ``sessions_valid_from`` (set with a
new password, to the next whole second, since a token's ``iat`` counts whole seconds) and its
``closed_at``. Tokens signup issues afterwards carry an ``iat`` no earlier than that second
(issuing waits for it to begin, at most a second).
Billing and licensing do the same from ``CredentialsChanged`` and ``CustomerClosed`` on the
log, each in a table of its own; the check "issued before the cut-off" is ``libs.http.auth``'s.
"""

from __future__ import annotations

import asyncio
import math
import time
from datetime import datetime
from typing import Any

import asyncpg
from litestar.connection import ASGIConnection

from libs.http.auth import SessionTokens, bearer, issued_before, session_refused


async def customer_in_session(
    pool: asyncpg.Pool, sessions: SessionTokens, token: str | None, *, closed_ok: bool = False
) -> str | None:
    """The customer a session token names, if signup still honours it. ``closed_ok`` lets a
    closed account's session through (only to hear the outcome of closing it again)."""
    customer_id = sessions.customer_of(token)
    if customer_id is None or token is None:
        return None
    row = await pool.fetchrow(
        "SELECT sessions_valid_from, closed_at FROM credentials WHERE customer_id = $1",
        customer_id,
    )
    if row is None or (row["closed_at"] is not None and not closed_ok):
        return None
    if issued_before(token, row["sessions_valid_from"]):
        return None
    return customer_id


async def require_session(
    pool: asyncpg.Pool,
    sessions: SessionTokens,
    connection: ASGIConnection[Any, Any, Any, Any],
    *,
    closed_ok: bool = False,
) -> str:
    """The customer of the request's bearer token if signup honours it; 401 otherwise."""
    customer_id = await customer_in_session(pool, sessions, bearer(connection), closed_ok=closed_ok)
    if customer_id is None:
        raise session_refused()
    return customer_id


def next_whole_second() -> int:
    """The first whole second after now: tokens issued from it on survive a reset made now."""
    return math.floor(time.time()) + 1


async def issue_session(
    sessions: SessionTokens, customer_id: str, email: str, valid_from: datetime | None
) -> str:
    """A session token that the customer's ``sessions_valid_from`` lets through. Within the
    second after a reset, that means waiting for the second to begin (at most one): a token's
    ``iat`` may not lie in the future, or every service would refuse it."""
    if valid_from is not None:
        wait = valid_from.timestamp() - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
    return sessions.issue(customer_id, email, now=max(time.time(), _start(valid_from)))


def _start(valid_from: datetime | None) -> float:
    return 0.0 if valid_from is None else float(math.ceil(valid_from.timestamp()))
