"""Forgotten passwords: a one-time link by mail, and a new password set with it.

Asking (``request_reset``) answers the same whether or not an account uses the email, so
nobody learns who has one; it is limited per client address (429) and per email (past that,
the same answer and no mail, so nobody can flood a mailbox). Setting the password
(``confirm_reset``) takes a link valid for an hour, once; in one transaction it stores the new
hash, uses the token up with every other open reset link of the customer, moves the
customer's ``sessions_valid_from`` to the next second (``recovery_sessions.py``: older sessions
stop working) and queues ``CredentialsChanged`` in the outbox. A confirm retried after its answer
was lost, with the same token and password, gets a session again instead of "link used".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from contracts import CredentialsChanged
from libs.http.auth import SessionTokens
from libs.http.errors import InvalidRequest
from libs.http.validation import FieldErrors, json_object
from libs.runtime.outbox import add_to_outbox
from services.signup.limits import forgive_login_attempt
from services.signup.mail import mail_reset_link, plausible_token, token_hash
from services.signup.models import EMAIL_MAX, check_email, check_password
from services.signup.passwords import Passwords
from services.signup.recovery_limits import reserve_from_address, within_email_limit
from services.signup.recovery_sessions import issue_session, next_whole_second
from services.signup.settings import SignupSettings

log = logging.getLogger(__name__)

RESET_REQUESTED = (
    "If an account uses this email, a link to choose a new password is on its way to it. "
    "The link works once, for 1 hour."
)
BAD_LINK = "is not a valid reset link, or it has expired or been used: ask for a new one"
# Password checks a client address may make through reset links per window (each costs a hash).
CONFIRMS_PER_ADDRESS = 30


class ResetRequested(msgspec.Struct, frozen=True, kw_only=True):
    """The 202 of ``POST /api/customers/password-reset``: the same for every email."""

    message: str = RESET_REQUESTED


class PasswordReset(msgspec.Struct, frozen=True, kw_only=True):
    """The 200 of ``POST /api/customers/password-reset/confirm``: signed in anew."""

    message: str
    customer_id: str
    email: str
    token: str
    token_expires_in: int


def parse_reset_request(data: Any) -> str:
    """The email of a reset request, lower-cased; 400 naming what is wrong."""
    body = json_object(data)
    errors = FieldErrors()
    errors.unknown(body, {"email"})
    given = errors.text(body, "email", required=True, limit=EMAIL_MAX)
    email = check_email(given, errors) if given is not None else None
    if errors or email is None:
        raise InvalidRequest("invalid request", fields=errors.fields)
    return email


def parse_reset_confirm(data: Any) -> tuple[str, str]:
    """The token and new password of a confirm; 400 naming every bad field."""
    body = json_object(data)
    errors = FieldErrors()
    errors.unknown(body, {"token", "password"})
    token = body.get("token")
    if not plausible_token(token):
        errors.add("token", BAD_LINK)
    password = check_password(body.get("password"), errors)
    if errors or password is None or not isinstance(token, str):
        raise InvalidRequest("invalid request", fields=errors.fields)
    return token, password


@dataclass
class PasswordResets:
    """Reset links and new passwords over signup's credentials."""

    pool: asyncpg.Pool
    passwords: Passwords
    sessions: SessionTokens
    settings: SignupSettings
    wake_mail: Callable[[], None]
    wake_events: Callable[[], None]

    async def request_reset(self, email: str, address: str) -> ResetRequested:
        """Mail a reset link if an open account uses ``email``; the same answer either way."""
        s = self.settings
        window = float(s.reset_links_window_seconds)
        async with self.pool.acquire() as conn:
            await reserve_from_address(
                conn, "reset", address, s.reset_links_max_per_address, window
            )
            if not await within_email_limit(
                conn, "reset", email, s.reset_links_max_per_email, window
            ):
                log.warning("password reset: too many links asked for one email; none sent")
                return ResetRequested()
            async with conn.transaction():
                # In force: the log made the account (a signup still appending has no row).
                customer_id = await conn.fetchval(
                    "SELECT c.customer_id FROM credentials c JOIN accounts a USING (customer_id) "
                    "WHERE c.email = $1 AND c.closed_at IS NULL AND a.closed_at IS NULL",
                    email,
                )
                if customer_id is not None:
                    await mail_reset_link(conn, s, customer_id, email)
        if customer_id is not None:
            self.wake_mail()
        return ResetRequested()

    async def confirm_reset(self, token: str, password: str, address: str) -> PasswordReset:
        """Set ``password`` with the reset link's ``token``; the customer is signed in anew."""
        async with self.pool.acquire() as conn:
            await reserve_from_address(
                conn,
                "reset-confirm",
                address,
                CONFIRMS_PER_ADDRESS,
                float(self.settings.reset_links_window_seconds),
            )
            row = await conn.fetchrow(
                "SELECT t.customer_id, t.email, t.used_at, c.password_hash, "
                "c.sessions_valid_from FROM account_tokens t JOIN credentials c USING "
                "(customer_id) WHERE t.token_hash = $1 AND t.purpose = 'reset_password' "
                "AND t.expires_at > now() AND c.closed_at IS NULL",
                token_hash(token),
            )
        if row is None:
            raise InvalidRequest("invalid request", fields=[{"field": "token", "reason": BAD_LINK}])
        if row["used_at"] is not None:
            return await self._answer_retry(row, password)
        new_hash = await self.passwords.hash(password)
        valid_from = datetime.fromtimestamp(next_whole_second(), UTC)
        async with self.pool.acquire() as conn, conn.transaction():
            used = await conn.fetchval(
                "UPDATE account_tokens SET used_at = now() WHERE token_hash = $1 "
                "AND used_at IS NULL RETURNING true",
                token_hash(token),
            )
            if not used:  # a concurrent confirm with this token won
                raise InvalidRequest(
                    "invalid request", fields=[{"field": "token", "reason": BAD_LINK}]
                )
            customer_id, email = row["customer_id"], row["email"]
            # Every other reset link of the customer is spent too.
            await conn.execute(
                "UPDATE account_tokens SET used_at = now() WHERE customer_id = $1 "
                "AND purpose = 'reset_password' AND used_at IS NULL",
                customer_id,
            )
            await conn.execute(
                "UPDATE credentials SET password_hash = $2, sessions_valid_from = $3 "
                "WHERE customer_id = $1",
                customer_id,
                new_hash,
                valid_from,
            )
            await add_to_outbox(
                conn,
                CredentialsChanged(
                    customer_id=customer_id,
                    changed_at=datetime.now(UTC),
                    sessions_valid_from=valid_from,
                ),
                customer_id=customer_id,
            )
            # The mailbox's owner may sign in again at once, whatever was guessed before.
            await forgive_login_attempt(conn, email, address)
        self.wake_events()
        return await self._signed_in(customer_id, email, valid_from)

    async def _answer_retry(self, row: asyncpg.Record, password: str) -> PasswordReset:
        """A used link: the same answer again if ``password`` is the one it set, else 400."""
        if not await self.passwords.verify(row["password_hash"], password):
            raise InvalidRequest("invalid request", fields=[{"field": "token", "reason": BAD_LINK}])
        return await self._signed_in(row["customer_id"], row["email"], row["sessions_valid_from"])

    async def _signed_in(
        self, customer_id: str, email: str, valid_from: datetime | None
    ) -> PasswordReset:
        return PasswordReset(
            message="Your password is changed; every other session is signed out.",
            customer_id=customer_id,
            email=email,
            token=await issue_session(self.sessions, customer_id, email, valid_from),
            token_expires_in=self.sessions.ttl_seconds,
        )
