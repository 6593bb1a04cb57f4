"""Email verification: a link mailed at signup (and again on request), and ``EmailVerified``
when it is opened.

The mail at signup is sent by a reactor on ``CustomerSignedUp`` (reactors are never replayed,
so a rebuilt account view mails nobody), which keeps the hashed token and the mail in the same
transaction as its checkpoint: once per signup. Opening the link uses the token up and queues
``EmailVerified`` in the outbox, in one transaction; the account view shows it once projected.
An unverified account keeps working: verification only tells us the address is the customer's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Literal

import asyncpg
import msgspec

from contracts import CustomerSignedUp, EmailVerified, PersonalData
from libs.db.postgres import Connection
from libs.projections.apply import Projection, Recorded
from libs.runtime.outbox import add_to_outbox
from libs.sealing.vault import data_key_for, personal_data_of, seal
from services.signup.mail import mail_verification_link, plausible_token, token_hash
from services.signup.personal_data import sealing_key
from services.signup.recovery_limits import reserve_for_customer
from services.signup.settings import SignupSettings

REACTOR = "verification_mails"
# A signup older than this when the reactor first sees it (the reactor is new on a platform
# with customers, or was down for days) gets no welcome mail: it asks for one on its page.
WELCOME_MAIL_MAX_AGE = timedelta(days=2)
RESEND_WINDOW_SECONDS = 3600.0


class VerificationSent(msgspec.Struct, frozen=True, kw_only=True):
    """The 202 of ``POST /api/customers/me/verification``."""

    email_verified: bool
    message: str


async def when_customer_signed_up_mail_verification(
    conn: Connection,
    r: Recorded[CustomerSignedUp],
    *,
    settings: SignupSettings,
) -> None:
    """Mail the new customer a link to verify their email."""
    e = r.event
    if e.signed_up_at < datetime.now(UTC) - WELCOME_MAIL_MAX_AGE:
        return
    personal = await personal_data_of(conn, e.customer_id, e)
    if personal is None or personal.email is None:
        return  # erased since: there is nobody to mail
    await mail_verification_link(conn, settings, e.customer_id, personal.email)


def verification_reactors(
    settings: SignupSettings, wake_mail: Callable[[], None]
) -> list[Projection]:
    """The reactor that mails a verification link to each new customer."""
    return [
        Projection(
            name=REACTOR,
            tables=(),
            handlers={
                CustomerSignedUp: partial(
                    when_customer_signed_up_mail_verification, settings=settings
                )
            },
            after_commit=wake_mail,
        )
    ]


Outcome = Literal["verified", "already_verified", "invalid"]


@dataclass
class Verifications:
    """Verification links over signup's tokens and accounts."""

    pool: asyncpg.Pool
    settings: SignupSettings
    wake_mail: Callable[[], None]
    wake_events: Callable[[], None]

    async def resend(self, customer_id: str) -> VerificationSent:
        """Mail the customer a new link, unless the email is verified already (limited)."""
        async with self.pool.acquire() as conn:
            account = await conn.fetchrow(
                "SELECT email, email_verified FROM accounts WHERE customer_id = $1", customer_id
            )
            if account is not None and account["email_verified"]:
                return VerificationSent(
                    email_verified=True, message="Your email address is verified already."
                )
            await reserve_for_customer(
                conn,
                "verify",
                customer_id,
                self.settings.verification_resend_max,
                RESEND_WINDOW_SECONDS,
            )
            email = (
                account["email"]
                if account is not None
                else await conn.fetchval(
                    "SELECT email FROM credentials WHERE customer_id = $1", customer_id
                )
            )
            async with conn.transaction():
                await mail_verification_link(conn, self.settings, customer_id, email)
        self.wake_mail()
        return VerificationSent(
            email_verified=False,
            message=f"A new link is on its way to {email}. It works once, for 2 days.",
        )

    async def verify(self, token: str) -> Outcome:
        """Use a verification link: ``verified`` the first time, ``already_verified`` for a
        used link whose email is verified, ``invalid`` for anything else."""
        if not plausible_token(token):
            return "invalid"
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "UPDATE account_tokens SET used_at = now() WHERE token_hash = $1 "
                "AND purpose = 'verify_email' AND used_at IS NULL AND expires_at > now() "
                "RETURNING customer_id, email",
                token_hash(token),
            )
            if row is None:
                used = await conn.fetchval(
                    "SELECT true FROM account_tokens WHERE token_hash = $1 "
                    "AND purpose = 'verify_email' AND used_at IS NOT NULL",
                    token_hash(token),
                )
                return "already_verified" if used else "invalid"
            key = await data_key_for(conn, sealing_key(self.settings), row["customer_id"])
            await add_to_outbox(
                conn,
                EmailVerified(
                    customer_id=row["customer_id"],
                    sealed=seal(key, EmailVerified.TYPE, PersonalData(email=row["email"])),
                    verified_at=datetime.now(UTC),
                ),
                customer_id=row["customer_id"],
            )
        self.wake_events()
        return "verified"
