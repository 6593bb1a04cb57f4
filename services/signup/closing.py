"""Closing an account, by the customer, with the password entered again.

The decision is taken on signup's credential row, in one transaction: ``closed_at`` is set
only if it was not, and only then is ``CustomerClosed`` (closed_by "customer", ``erase`` as
asked) queued in the outbox. So a retried close, after an answer that was lost, finds the
account closed and answers with that outcome, and the log holds one ``CustomerClosed``. From
that commit on the account cannot sign in and its sessions are refused by signup
(``recovery_sessions.py``); the provisioner removes the instance when it reads the event.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from contracts import CustomerClosed, PersonalData
from libs.http.errors import Conflict, InvalidRequest, NotFound
from libs.http.validation import FieldErrors, json_object
from libs.runtime.outbox import add_to_outbox
from libs.sealing.vault import data_key_for, master_key, seal
from services.signup.erasure import erase_in
from services.signup.limits import forgive_login_attempt, login_limits, reserve_login_attempt
from services.signup.models import PASSWORD_MAX
from services.signup.passwords import Passwords
from services.signup.personal_data import sealing_key
from services.signup.settings import SignupSettings

REASON_MAX = 500
NOT_THEIRS = "is not your current password"


class CloseForm(msgspec.Struct, frozen=True, kw_only=True):
    """A request to close the account, checked for shape."""

    password: str
    erase: bool = False
    reason: str | None = None


class AccountClosed(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to ``POST /api/customers/me/close`` (the same to every retry)."""

    customer_id: str
    closed_at: datetime
    erase: bool
    message: str


def parse_close(data: Any) -> CloseForm:
    """Check a close body; 400 naming every bad field."""
    body = json_object(data)
    errors = FieldErrors()
    errors.unknown(body, {"password", "erase", "reason"})
    password = body.get("password")
    if not isinstance(password, str) or not password:
        errors.add("password", "is required")
    elif len(password) > PASSWORD_MAX:
        errors.add("password", f"must be at most {PASSWORD_MAX} characters")
    erase = body.get("erase", False)
    if not isinstance(erase, bool):
        errors.add("erase", "must be true or false")
    reason = errors.text(body, "reason", required=False, limit=REASON_MAX)
    if errors or not isinstance(password, str) or not isinstance(erase, bool):
        raise InvalidRequest("invalid request", fields=errors.fields)
    return CloseForm(password=password, erase=erase, reason=reason or None)


def outcome_message(erase: bool) -> str:
    """What closing did, in a sentence."""
    data = "its data is erased" if erase else "its data is kept for the grace period, then deleted"
    return f"Your account is closed. Your instance is being stopped and {data}."


@dataclass
class Closings:
    """Closing accounts over signup's credentials, and the outbox."""

    pool: asyncpg.Pool
    passwords: Passwords
    settings: SignupSettings
    wake_events: Callable[[], None]

    async def close(self, customer_id: str, form: CloseForm, address: str) -> AccountClosed:
        """Close the account if ``form.password`` is the customer's; the first outcome again
        for a closed one. 400 naming the password when it is wrong (counted like a login)."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT email, password_hash FROM credentials WHERE customer_id = $1",
                customer_id,
            )
            if row is None:
                raise NotFound("no such account")
            # An erased customer's credential names no email: their tries count by their id.
            who = row["email"] or f"customer:{customer_id}"
            await reserve_login_attempt(conn, login_limits(self.settings), who, address)
        if not await self.passwords.verify(row["password_hash"], form.password):
            raise InvalidRequest(
                "invalid request", fields=[{"field": "password", "reason": NOT_THEIRS}]
            )
        async with self.pool.acquire() as conn, conn.transaction():
            await forgive_login_attempt(conn, who, address)
            closed = await _close_once(conn, customer_id, form, self.settings)
        self.wake_events()
        erase = bool(closed["close_erase"])
        return AccountClosed(
            customer_id=customer_id,
            closed_at=closed["closed_at"],
            erase=erase,
            message=outcome_message(erase),
        )


class SubscriptionStillPaid(Conflict):
    """409: a paid subscription must be canceled before the account closes."""

    code = "subscription_active"


# A paid subscription is billed by Stripe until it is canceled: closing waits until the customer
# has canceled it in the billing portal, so that nobody is surprised by what ends when. (Billing
# cancels at Stripe only a subscription that raced the closure: billing/closing.py.)
PAID = ("active", "past_due")


async def _close_once(
    conn: asyncpg.Connection, customer_id: str, form: CloseForm, settings: SignupSettings
) -> asyncpg.Record:
    """Mark the account closed and queue ``CustomerClosed``, unless it was closed before (by
    this customer or an operator): then its first outcome. 409 while a subscription is paid."""
    closed = await conn.fetchrow(
        "UPDATE credentials SET closed_at = now(), close_erase = $2 "
        "WHERE customer_id = $1 AND closed_at IS NULL AND NOT EXISTS (SELECT 1 FROM accounts a "
        "WHERE a.customer_id = $1 "
        "AND (a.closed_at IS NOT NULL OR a.subscription_status = ANY($3::text[]))) "
        "RETURNING closed_at, close_erase",
        customer_id,
        form.erase,
        list(PAID),
    )
    if closed is not None:
        sealed = None
        if form.reason is not None:  # their words may name anyone: sealed like their name
            key = await data_key_for(conn, sealing_key(settings), customer_id)
            sealed = seal(key, CustomerClosed.TYPE, PersonalData(reason=form.reason))
        await add_to_outbox(
            conn,
            CustomerClosed(
                customer_id=customer_id, closed_by="customer", erase=form.erase, sealed=sealed
            ),
            customer_id=customer_id,
        )
        if form.erase:
            # Asked for erasure: the personal data goes with the account, in this transaction.
            secret = settings.data_keys_master_key
            await erase_in(conn, customer_id, "customer", master_key(secret) if secret else None)
        return closed
    before = await conn.fetchrow(
        "SELECT coalesce(c.closed_at, a.closed_at) AS closed_at, c.close_erase, "
        "a.subscription_status FROM credentials c LEFT JOIN accounts a USING (customer_id) "
        "WHERE c.customer_id = $1",
        customer_id,
    )
    assert before is not None
    if before["closed_at"] is None:
        raise SubscriptionStillPaid(
            "your subscription is still paid for: cancel it first on the billing portal "
            "(your account page), so that it is not charged again, then close the account"
        )
    return before
