"""Signing a customer up: the limits first, then the log decides who got the email first.

The credential is kept, with the ``CustomerSignedUp`` it is for, before the event is offered to
the log on the email's own subject (expected last sequence 0: the first writer owns the email).
The event's personal data is sealed with the customer's data key (``libs/sealing``), and the
subject names the email by a keyed hash, so neither the body nor the subject names anyone.
A retry whose first try's outcome the client never learned finds that try again, and offers
its event once more, so the answer is that account whether or not the first append was stored.
This module is where ``CustomerSignedUp`` is appended.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from prometheus_client import CollectorRegistry, Counter

from contracts import (
    CustomerSignedUp,
    Envelope,
    PersonalData,
    decode_envelope,
    encode_envelope,
)
from libs.eventlog.errors import AppendRefused, ConcurrencyConflict
from libs.eventlog.store import Appended, EventStore, traced_envelope
from libs.http.errors import Conflict
from libs.runtime.service import ServiceUnavailable
from libs.sealing.vault import data_key_for, seal
from services.signup.account_view import (
    WAITING_FOR_CAPACITY,
    deployment_of,
    license_of,
    platform_full,
    subscription_of,
)
from services.signup.limits import (
    forgive_login_attempt,
    login_limits,
    reserve_login_attempt,
    reserve_signup,
    signup_limits,
)
from services.signup.models import CustomerOut, SignupAnswer, SignupForm
from services.signup.passwords import Passwords
from services.signup.personal_data import sealing_key
from services.signup.settings import SignupSettings

# A credential younger than this may belong to a signup whose request is still appending (an
# append gives up after 5 s); a retry takes it up only after that.
IN_FLIGHT_SECONDS = 10.0
# A try not stored this long ago is not offered to the log again: its signup time (and so its
# trial) would be that old. JetStream's duplicate window, by default.
PENDING_REUSE_SECONDS = 900.0
# Earlier tries of one email looked at (each costs a password check).
MAX_EARLIER_TRIES = 3
# How long a retried signup whose event the log already holds waits for the account view to
# say whose the email is, before answering 503 (the client retries again).
OWNER_WAIT_SECONDS = 3.0


@functools.cache
def signups_counter(registry: CollectorRegistry) -> Counter:
    """``iotistic_signups_total`` of a process's registry (one per registry)."""
    return Counter(
        "iotistic_signups",
        "Accounts opened: signups whose CustomerSignedUp this process appended",
        registry=registry,
    )


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Signups:
    """Sign-ups over the signup schema's credentials and accounts, and the log."""

    pool: asyncpg.Pool
    store: EventStore
    passwords: Passwords
    settings: SignupSettings
    # Accounts opened (``iotistic_signups_total``); None where nobody scrapes them.
    opened: Counter | None = None

    async def sign_up(self, form: SignupForm, address: str) -> SignupAnswer:
        """Open an account: the limits first, then the log decides who got the email first.

        A retry of a signup whose outcome the client never learned (the same email and
        password, with or without an Idempotency-Key) answers with that account, whether its
        event was stored the first time or is stored now.
        """
        await reserve_signup(self.pool, signup_limits(self.settings), address)
        customer_id = await self._earlier_signup(form, address)
        if customer_id is None:
            customer_id = await self._new_signup(form, address)
        row = await self._wait_for_answers(customer_id)
        now = _now()
        deployment = deployment_of(row, await platform_full(self.pool))
        return SignupAnswer(
            message="Account created. Your trial has started; your instance is being deployed."
            if deployment.status != WAITING_FOR_CAPACITY
            else "Account created. Your trial has started; your instance starts as soon as the "
            "platform has room for it.",
            customer=CustomerOut(
                customer_id=customer_id,
                email=form.email,
                company_name=row["company_name"] if row is not None else form.company_name,
            ),
            subscription=subscription_of(row, now),
            license=license_of(row),
            deployment=deployment,
        )

    async def _new_signup(self, form: SignupForm, address: str) -> str:
        """Keep the credential with the event it is for, then offer the event to the log."""
        customer_id = str(uuid.uuid4())
        master = sealing_key(self.settings)
        password_hash = await self.passwords.hash(form.password)
        async with self.pool.acquire() as conn:
            data_key = await data_key_for(conn, master, customer_id)
        personal = PersonalData(
            email=form.email,
            email_display=form.email_display,
            company_name=form.company_name,
            full_name=form.full_name,
        )
        envelope = traced_envelope(
            CustomerSignedUp(
                customer_id=customer_id,
                sealed=seal(data_key, CustomerSignedUp.TYPE, personal),
                plan="starter",
                signed_up_at=_now(),
                trial_days=self.settings.default_trial_days,
            ),
            customer_id=customer_id,
        )
        await self.pool.execute(
            "INSERT INTO credentials (customer_id, email, password_hash, pending_envelope) "
            "VALUES ($1, $2, $3, $4)",
            customer_id,
            form.email,
            password_hash,
            encode_envelope(envelope),
        )
        try:
            appended = await self._append_on_email(envelope, form.email)
        except AppendRefused:
            await self._forget_unstored(customer_id)  # certainly not stored: nothing is left
            raise
        except ConcurrencyConflict:
            await self._forget_unstored(customer_id)
            # The email is taken. By this client's own earlier try, not yet recognisable as
            # such (still in flight, or the account view behind)? Then it is to come back.
            if await self._same_details_tried(form, address, besides=customer_id):
                raise ServiceUnavailable(
                    "an earlier signup with these details is still being set up; retry shortly"
                ) from None
            raise Conflict("an account with this email already exists") from None
        await self._confirm(customer_id, appended.seq)
        if self.opened is not None:
            self.opened.inc()
        return customer_id

    async def _append_on_email(self, envelope: Envelope, email: str) -> Appended:
        """Append a signup on its email's subject, first writer wins: none there yet, or only
        the signup of a customer since erased (``erasure.py`` released the subject)."""
        subject_key = sealing_key(self.settings).email_subject(email)
        try:
            return await self.store.append(envelope, key=subject_key, expected_last_subject_seq=0)
        except ConcurrencyConflict as conflict:
            released = conflict.last_seq is not None and await self.pool.fetchval(
                "SELECT true FROM released_email_subjects WHERE subject_key = $1 AND last_seq = $2",
                subject_key,
                conflict.last_seq,
            )
            if not released:
                raise
            return await self.store.append(
                envelope, key=subject_key, expected_last_subject_seq=conflict.last_seq
            )

    async def _earlier_signup(self, form: SignupForm, address: str) -> str | None:
        """The customer an earlier signup with this email and password made (or may have
        made: its event is offered to the log again), None when there was none; 409 when the
        email is someone else's."""
        async with self.pool.acquire() as conn:
            owner = await conn.fetchrow(
                "SELECT customer_id, closed_at FROM accounts WHERE email = $1", form.email
            )
            rows = await conn.fetch(
                "SELECT customer_id, password_hash, pending_envelope, "
                "created_at > now() - make_interval(secs => $2) AS in_flight, "
                "created_at > now() - make_interval(secs => $3) AS reusable "
                "FROM credentials WHERE email = $1 ORDER BY created_at DESC LIMIT $4",
                form.email,
                IN_FLIGHT_SECONDS,
                PENDING_REUSE_SECONDS,
                MAX_EARLIER_TRIES,
            )
            if owner is not None:
                if owner["closed_at"] is not None:
                    raise Conflict("an account with this email already exists")
                candidates = [r for r in rows if r["customer_id"] == owner["customer_id"]]
            else:
                # A signup still in flight is not yet an earlier one: its request will answer.
                # One sent long ago is not offered again: its signup time (and so its trial)
                # would be that old; a new signup is made instead.
                candidates = [
                    r
                    for r in rows
                    if not r["in_flight"] and r["reusable"] and r["pending_envelope"] is not None
                ]
            if not candidates:
                if owner is not None:
                    raise Conflict("an account with this email already exists")
                return None
            # Answering "that is your account" says the password is right: a guess costs what
            # a failed login costs, so signup is no way around the login limits.
            await reserve_login_attempt(conn, login_limits(self.settings), form.email, address)
        mine = [
            r for r in candidates if await self.passwords.verify(r["password_hash"], form.password)
        ]
        if not mine:
            if owner is not None:
                raise Conflict("an account with this email already exists")
            return None
        await self._forget(form.email, address)
        if owner is not None:
            await self._confirm(owner["customer_id"])
            return str(owner["customer_id"])
        return await self._append_again(form.email, mine)

    async def _append_again(self, email: str, mine: list[asyncpg.Record]) -> str:
        """Offer the newest of this client's unanswered signups to the log again: stored
        now, or found stored already (by this or another of its tries)."""
        customer_id = str(mine[0]["customer_id"])
        envelope = decode_envelope(mine[0]["pending_envelope"])
        try:
            appended: Appended | None = await self._append_on_email(envelope, email)
        except ConcurrencyConflict:
            appended = None
            # Stored longer ago than JetStream keeps event ids, or another try won: the
            # account view, built from the log, says whose the email is.
            owner = await self._owner_of(email)
            if owner is None:
                raise ServiceUnavailable(
                    "the account is still being set up; retry shortly"
                ) from None
            if owner not in {str(r["customer_id"]) for r in mine}:
                await self._forget_unstored(customer_id)
                raise Conflict("an account with this email already exists") from None
            customer_id = owner
        await self._confirm(customer_id, appended.seq if appended is not None else None)
        return customer_id

    async def _same_details_tried(self, form: SignupForm, address: str, besides: str) -> bool:
        """Whether another unanswered signup with this email has this password."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT password_hash FROM credentials WHERE email = $1 AND customer_id <> $2 "
                "AND NOT confirmed ORDER BY created_at DESC LIMIT $3",
                form.email,
                besides,
                MAX_EARLIER_TRIES,
            )
            if not rows:
                return False
            await reserve_login_attempt(conn, login_limits(self.settings), form.email, address)
        for row in rows:
            if await self.passwords.verify(row["password_hash"], form.password):
                await self._forget(form.email, address)
                return True
        return False

    async def _forget_unstored(self, customer_id: str) -> None:
        """Drop a credential whose event the log did not take from this request, unless the
        account view shows it was stored after all (by a retry of the same try)."""
        await self.pool.execute(
            "DELETE FROM credentials c WHERE customer_id = $1 AND NOT confirmed "
            "AND NOT EXISTS (SELECT 1 FROM accounts a WHERE a.customer_id = c.customer_id)",
            customer_id,
        )

    async def _forget(self, email: str, address: str) -> None:
        async with self.pool.acquire() as conn:
            await forgive_login_attempt(conn, email, address)

    async def _confirm(self, customer_id: str, signup_seq: int | None = None) -> None:
        """The credential's signup is on the log (at ``signup_seq``, when known)."""
        await self.pool.execute(
            "UPDATE credentials SET confirmed = true, pending_envelope = NULL, "
            "signup_seq = coalesce(signup_seq, $2) WHERE customer_id = $1",
            customer_id,
            signup_seq,
        )

    async def _owner_of(self, email: str) -> str | None:
        """Who the account view says owns ``email``, waiting a moment for it to catch up."""
        deadline = time.monotonic() + OWNER_WAIT_SECONDS
        while True:
            owner = await self.pool.fetchval(
                "SELECT customer_id FROM accounts WHERE email = $1", email
            )
            if owner is not None or time.monotonic() > deadline:
                return None if owner is None else str(owner)
            await asyncio.sleep(0.05)

    async def _wait_for_answers(self, customer_id: str) -> asyncpg.Record | None:
        """The account row once licensing and billing have answered, or as it is at the deadline."""
        deadline = time.monotonic() + self.settings.signup_wait_ms / 1000
        delay = 0.005
        row = None
        while True:
            row = await self.pool.fetchrow(
                "SELECT * FROM accounts WHERE customer_id = $1", customer_id
            )
            answered = (
                row is not None
                and row["license_jwt"] is not None
                and row["subscription_status"] != "pending"
            )
            if answered or time.monotonic() + delay > deadline:
                return row
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.05)
