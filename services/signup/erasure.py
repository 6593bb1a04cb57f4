"""Erasing a customer's personal data, on a log that never forgets.

The events stay; what they say about the person is sealed with the customer's data key
(``libs/sealing``). Erasing destroys that key, so every copy of their sealed data, on the log
and in its backups, can no longer be read; the views drop the rest when ``CustomerErased``
reaches them (signup's accounts, billing's customers).

Only a closed account is erased (an open one still needs its email to sign in and be billed):
the decision is taken on signup's credential row, which records the closure in the transaction
that queued its ``CustomerClosed``, or on the account view, whose closure never goes back. In
one transaction: the key is destroyed, the private state naming the person (credential email
and password hash, unsent and sent mail, one-time links) goes, and ``CustomerErased`` is queued
in the outbox. A retried erasure finds the first outcome; the outbox relays the event once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import asyncpg
import msgspec
from litestar import Controller, Router, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath

from contracts import CustomerErased
from libs.db.postgres import CONNECTION_ERRORS
from libs.http.auth import admin_guard
from libs.http.errors import Conflict, NotFound
from libs.runtime.outbox import add_to_outbox, outbox_relay
from libs.runtime.service import ServiceRuntime
from libs.sealing.vault import MasterKey, destroy_data_key, master_key, vacuum_keys
from services.signup.limits import email_key

log = logging.getLogger(__name__)

# Tables whose dead row versions still hold what was erased: vacuumed right after.
_VACUUMED = (
    "mail_outbox",
    "credentials",
    "account_tokens",
    "idempotency_keys",
    "accounts",
    "login_failures",
    "signup_windows",
)


class ErasureAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to an erasure (the same to every retry)."""

    customer_id: str
    erased_at: datetime
    key_id: str | None
    message: str


class AccountStillOpen(Conflict):
    """409: only a closed account is erased."""

    code = "account_open"


async def erase_in(
    conn: asyncpg.Connection,
    customer_id: str,
    erased_by: Literal["customer", "admin"],
    master: MasterKey | None,
) -> ErasureAnswer:
    """Erase the customer in the caller's transaction (see the module's docstring). With the
    ``master`` key, their email's subject on the log is released for a new signup."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"erase:{customer_id}")
    cred = await conn.fetchrow(
        "SELECT email, closed_at, erased_at, erased_key_id, signup_seq FROM credentials "
        "WHERE customer_id = $1",
        customer_id,
    )
    account = await conn.fetchrow(
        "SELECT email, email_display, closed_at FROM accounts WHERE customer_id = $1",
        customer_id,
    )
    if cred is None and account is None:
        raise NotFound("no such customer")
    if cred is not None and cred["erased_at"] is not None:
        return _answer(customer_id, cred["erased_at"], cred["erased_key_id"])
    closed = (cred is not None and cred["closed_at"] is not None) or (
        account is not None and account["closed_at"] is not None
    )
    if not closed:
        raise AccountStillOpen(
            "the account is open: close it first (the customer closes it with erase: true, "
            "or an operator closes it), then erase it"
        )
    emails = {
        value.lower()
        for row in (cred, account)
        if row is not None
        for key in ("email", "email_display")
        if key in row and (value := row[key])
    }
    # Links first: a verification in flight holds its link's row, then takes the key's; taking
    # them in the same order, the two wait for each other instead of deadlocking.
    await conn.execute("DELETE FROM account_tokens WHERE customer_id = $1", customer_id)
    key_id = await destroy_data_key(conn, customer_id)
    if master is not None and cred is not None and cred["email"] and cred["signup_seq"]:
        await conn.execute(
            "INSERT INTO released_email_subjects (subject_key, last_seq) VALUES ($1, $2) "
            "ON CONFLICT (subject_key) DO UPDATE SET last_seq = EXCLUDED.last_seq",
            master.email_subject(cred["email"]),
            cred["signup_seq"],
        )
    erased_at = datetime.now(UTC)
    await _forget_private_state(conn, customer_id, sorted(emails), erased_at, key_id)
    await add_to_outbox(
        conn,
        CustomerErased(
            customer_id=customer_id, key_id=key_id, erased_by=erased_by, erased_at=erased_at
        ),
        customer_id=customer_id,
    )
    return _answer(customer_id, erased_at, key_id)


async def _forget_private_state(
    conn: asyncpg.Connection,
    customer_id: str,
    emails: list[str],
    erased_at: datetime,
    key_id: str | None,
) -> None:
    """Drop what signup's private state says of the person: mail to them (sent or not),
    a keyed signup's stored answer (it names them; its request hash is
    of their details), and the credential's email. The password hash stays: it names no one,
    and a retried close still needs it to find its first outcome."""
    await conn.execute("DELETE FROM mail_outbox WHERE lower(recipient) = ANY($1::text[])", emails)
    # The abuse limits' counters are keyed by an unkeyed hash of the email (anyone guessing
    # the address could match it): gone now, not at the window's end.
    keys = sorted({f"email:{email_key(e)}" for e in emails})
    await conn.execute("DELETE FROM login_failures WHERE subject = ANY($1::text[])", keys)
    await conn.execute(
        "DELETE FROM signup_windows WHERE EXISTS (SELECT 1 FROM unnest($1::text[]) k "
        "WHERE right(subject, length(k) + 1) = ':' || k)",
        keys,
    )
    await conn.execute(
        "DELETE FROM idempotency_keys WHERE response -> 'customer' ->> 'customer_id' = $1",
        customer_id,
    )
    await conn.execute(
        "INSERT INTO credentials (customer_id, confirmed, closed_at) VALUES ($1, true, $2) "
        "ON CONFLICT (customer_id) DO NOTHING",
        customer_id,
        erased_at,
    )
    await conn.execute(
        "UPDATE credentials SET email = NULL, pending_envelope = NULL, "
        "erased_at = $2, erased_key_id = $3 WHERE customer_id = $1",
        customer_id,
        erased_at,
        key_id,
    )


def _answer(customer_id: str, erased_at: datetime, key_id: str | None) -> ErasureAnswer:
    return ErasureAnswer(
        customer_id=customer_id,
        erased_at=erased_at,
        key_id=key_id,
        message="The customer's personal data is erased: their data key is destroyed, so no "
        "copy of it on the log can be read, and every view drops it.",
    )


async def vacuum_erased(pool: asyncpg.Pool) -> None:
    """Reclaim dead row versions that still hold what an erasure removed (best effort: the
    erasure stands without it, and autovacuum gets there later)."""
    try:
        async with pool.acquire() as conn:
            await vacuum_keys(conn)
            for table in _VACUUMED:
                await conn.execute(f"VACUUM {table}")
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
        log.warning("erasure: vacuum not done now (%s); autovacuum will", exc)


@dataclass
class Erasures:
    """Erasures over signup's database and its outbox."""

    pool: asyncpg.Pool
    wake_events: Callable[[], None]
    master: MasterKey | None

    async def erase(
        self, customer_id: str, erased_by: Literal["customer", "admin"] = "admin"
    ) -> ErasureAnswer:
        """Erase a closed customer's personal data (409 while open, 404 for no customer)."""
        async with self.pool.acquire() as conn, conn.transaction():
            answer = await erase_in(conn, customer_id, erased_by, self.master)
        self.wake_events()
        with contextlib.suppress(Exception):
            await vacuum_erased(self.pool)
        return answer


class ErasureController(Controller):
    """``POST /api/customers/{customer_id}/erase`` (admin)."""

    path = "/api/customers"
    tags = ("customers",)

    @post("/{customer_id:str}/erase", status_code=200)
    async def erase(
        self, customer_id: FromPath[str], erasures: NamedDependency[Erasures]
    ) -> ErasureAnswer:
        """Erase a closed customer's personal data: their data key is destroyed."""
        if not 1 <= len(customer_id) <= 128:
            raise NotFound("no such customer")
        return await erasures.erase(customer_id, "admin")


def erasure_router(runtime: ServiceRuntime) -> Router:
    """The erasure route behind the admin credential."""

    secret = runtime.settings.data_keys_master_key
    master = master_key(secret) if secret else None

    def erasures() -> Erasures:
        return Erasures(runtime.db(), outbox_relay(runtime).wake, master)

    return Router(
        "/",
        route_handlers=[ErasureController],
        guards=[admin_guard(runtime.settings.admin_token)],
        dependencies={"erasures": Provide(erasures, sync_to_thread=False)},
    )
