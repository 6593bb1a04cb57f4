"""Logging in: a session token for the right password, the same 401 for every wrong answer.

Each attempt is counted against the email and the client address before its password is hashed
(``limits.py``), so guessing costs what the limits allow and no more. A sign-in an instance's
dashboard relays for a browser counts against the browser's address, once per relay nonce.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from libs.http.auth import LOGIN_RELAY_MAX_AGE_SECONDS, RelayedClient, SessionTokens
from libs.http.errors import Forbidden, Unauthorized
from services.signup.account_view import license_of
from services.signup.limits import forgive_login_attempt, login_limits, reserve_login_attempt
from services.signup.models import LoginAnswer, LoginForm
from services.signup.passwords import Passwords
from services.signup.recovery_sessions import issue_session
from services.signup.settings import SignupSettings

# Assertions older than LOGIN_RELAY_MAX_AGE_SECONDS are refused by their timestamp, so their
# nonces need keeping only a while longer (clocks of instances may run a little ahead).
RELAY_NONCE_KEEP_SECONDS = 10 * LOGIN_RELAY_MAX_AGE_SECONDS


async def first_use_of_relay(conn: asyncpg.Connection, nonce: str) -> bool:
    """True the first time a relayed sign-in's nonce is seen (on any replica), False after."""
    inserted = await conn.fetchval(
        "INSERT INTO login_relay_nonces (nonce) VALUES ($1) ON CONFLICT DO NOTHING RETURNING true",
        nonce,
    )
    return bool(inserted)


class AccountClosed(Forbidden):
    """403: the password is right, but the customer closed the account."""

    code = "account_closed"


@dataclass
class Logins:
    """Log-ins over the signup schema's credentials and accounts."""

    pool: asyncpg.Pool
    passwords: Passwords
    sessions: SessionTokens
    settings: SignupSettings

    async def log_in(
        self, form: LoginForm, address: str, relayed: RelayedClient | None = None
    ) -> LoginAnswer:
        """A session token for the right password; the same 401 for every wrong answer.

        ``address`` is the caller's; a sign-in an instance relayed with a valid signature
        (``relayed``) counts against the browser address it vouches for instead, once."""
        async with self.pool.acquire() as conn:
            if relayed is not None and await first_use_of_relay(conn, relayed.nonce):
                address = relayed.address
            await reserve_login_attempt(conn, login_limits(self.settings), form.email, address)
            # In force: confirmed by the request that appended it, or proven by the account
            # the log made (the request may have died between the append and the confirm).
            row = await conn.fetchrow(
                "SELECT customer_id, password_hash, closed_at, sessions_valid_from "
                "FROM credentials c WHERE email = $1 "
                "AND (confirmed OR EXISTS (SELECT 1 FROM accounts a "
                "WHERE a.customer_id = c.customer_id))",
                form.email,
            )
        ok = await self.passwords.verify(row["password_hash"] if row else None, form.password)
        async with self.pool.acquire() as conn:
            if not ok or row is None:
                raise Unauthorized("invalid email or password")  # the attempt stays counted
            account = await conn.fetchrow(
                "SELECT * FROM accounts WHERE customer_id = $1", row["customer_id"]
            )
            if row["closed_at"] is not None or (
                account is not None and account["closed_at"] is not None
            ):
                # Told plainly, to the one who knows the password only (still counted).
                raise AccountClosed("this account is closed; it cannot sign in any more")
            await forgive_login_attempt(conn, form.email, address)
        return LoginAnswer(
            customer_id=row["customer_id"],
            email=form.email,
            license=license_of(account),
            token=await issue_session(
                self.sessions, row["customer_id"], form.email, row["sessions_valid_from"]
            ),
            token_expires_in=self.sessions.ttl_seconds,
        )
