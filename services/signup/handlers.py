"""What the signup service decides: sign a customer up, log them in, show their account."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from contracts import CustomerSignedUp, Features, decode_envelope, encode_envelope
from libs.eventlog.errors import AppendRefused, ConcurrencyConflict
from libs.eventlog.store import EventStore, traced_envelope
from libs.http.auth import LOGIN_RELAY_MAX_AGE_SECONDS, RelayedClient, SessionTokens
from libs.http.errors import Conflict, DomainError, NotFound, TooManyRequests, Unauthorized
from libs.runtime.service import ServiceUnavailable
from libs.timeutil import days_remaining
from services.signup.models import (
    AccountView,
    CustomerOut,
    DeploymentOut,
    LicenseOut,
    LoginAnswer,
    LoginForm,
    SignupAnswer,
    SignupForm,
    SubscriptionOut,
)
from services.signup.passwords import Passwords
from services.signup.settings import SignupSettings

ACCOUNT_URL = "/api/customers/me"
ESTIMATED_DEPLOY_TIME = "a few seconds"
WAITING_FOR_CAPACITY = "waiting_for_capacity"
WAITING_FOR_CAPACITY_DETAIL = (
    "The platform is running all the instances it can hold right now. Yours is queued and "
    "starts by itself as soon as a slot frees; your account and trial are ready meanwhile."
)
# Deployment states of a job not started yet (or of no job yet).
NOT_UNDER_WAY = ("pending", "queued")
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


class IdempotencyMismatch(DomainError):
    """422: an Idempotency-Key reused for a different request."""

    status_code = 422
    code = "idempotency_key_reused"


def email_key(email: str) -> str:
    """The subject key of an email: first writer on it owns the email (no PII in subjects)."""
    return hashlib.sha256(email.encode()).hexdigest()[:40]


def _now() -> datetime:
    return datetime.now(UTC)


# --- the account view --------------------------------------------------------------------------


def subscription_of(row: asyncpg.Record | None, now: datetime) -> SubscriptionOut:
    """The subscription part of the account view (pending until billing has answered)."""
    if row is None or row["subscription_status"] == "pending":
        return SubscriptionOut(
            plan="starter", status="pending", trial_ends_at=None, trial_days_remaining=None
        )
    ends = row["trial_ends_at"]
    remaining = None
    if ends is not None and row["subscription_status"] == "trialing":
        remaining = days_remaining(ends, now)
    return SubscriptionOut(
        plan=row["plan"],
        status=row["subscription_status"],
        trial_ends_at=ends,
        trial_days_remaining=remaining,
    )


def license_of(row: asyncpg.Record | None) -> LicenseOut:
    """The current license (pending until licensing has issued one)."""
    if row is None or row["license_jwt"] is None:
        return LicenseOut(status="pending", jwt=None, expires_at=None, features=None)
    features = msgspec.json.decode(row["license_features"], type=Features)
    return LicenseOut(
        status="active",
        jwt=row["license_jwt"],
        expires_at=row["license_expires_at"],
        features=features,
        plan=row["license_plan"],
    )


def deployment_of(row: asyncpg.Record | None, platform_full: bool = False) -> DeploymentOut:
    """The instance's deployment (pending until the provisioner has taken it up). With
    ``platform_full``, one not under way yet is shown waiting for capacity: the provisioner
    will hold it until an instance's slot frees."""
    status = "pending" if row is None else row["deployment_status"]
    if platform_full and status in NOT_UNDER_WAY:
        status = WAITING_FOR_CAPACITY
    waiting = status == WAITING_FOR_CAPACITY
    if row is None:
        return DeploymentOut(
            status=status,
            job_id=None,
            instance_url=None,
            estimated_time=None if waiting else ESTIMATED_DEPLOY_TIME,
            check_status_url=ACCOUNT_URL,
            detail=WAITING_FOR_CAPACITY_DETAIL if waiting else None,
        )
    ready = status == "ready"
    return DeploymentOut(
        status=status,
        job_id=row["deployment_job_id"],
        instance_url=row["instance_url"],
        estimated_time=None if ready or waiting else ESTIMATED_DEPLOY_TIME,
        check_status_url=ACCOUNT_URL,
        progress=row["deployment_progress"],
        step=row["deployment_step"],
        error=row["deployment_error"],
        detail=WAITING_FOR_CAPACITY_DETAIL if waiting else None,
        degraded_since=row["instance_degraded_since"],
        health_reason=row["instance_health_reason"],
    )


async def platform_full(pool: asyncpg.Pool) -> bool:
    """Whether the provisioner last said the platform runs all the instances it can hold."""
    return bool(await pool.fetchval('SELECT "full" FROM platform_capacity'))


# --- abuse limits: signups and failed logins ------------------------------------------------------


def address_subject(address: str) -> str:
    """What a client address is counted under: an IPv4 address, or the /64 an IPv6 address is
    in (one subscriber holds a /64 or more, so single IPv6 addresses would count nothing)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"addr:{address[:64]}"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"addr:{ip.ipv4_mapped}"
        return f"addr:{ipaddress.IPv6Network((ip, 64), strict=False)}"
    return f"addr:{ip}"


@dataclass(frozen=True)
class SignupLimits:
    """How many signups a window allows, per client address and overall."""

    per_address: int
    address_window_seconds: int
    per_hour: int


async def reserve_signup(pool: asyncpg.Pool, limits: SignupLimits, address: str) -> None:
    """Count a signup against its address and the overall cap before any work is done, in one
    transaction; 429 with Retry-After, and nothing counted, when either is spent."""
    subjects = [address_subject(address), "all"]
    allowed = {subjects[0]: limits.per_address, "all": limits.per_hour}
    async with pool.acquire() as conn, conn.transaction():
        # One statement counts both; its row locks make concurrent signups take turns, so
        # every replica sees the same count. The order of the subjects is always the same.
        # Retry-After is measured from the clock, not now(): now() is when this transaction
        # began, which may be before a concurrent one (that we waited for) opened the window.
        rows = await conn.fetch(
            """
            INSERT INTO signup_windows AS w (subject, window_ends_at, signups)
            SELECT subject, now() + make_interval(secs => secs), 1
            FROM unnest($1::text[], $2::float8[]) AS t(subject, secs)
            ON CONFLICT (subject) DO UPDATE SET
                signups = CASE WHEN w.window_ends_at <= now() THEN 1 ELSE w.signups + 1 END,
                window_ends_at = CASE WHEN w.window_ends_at <= now()
                                      THEN EXCLUDED.window_ends_at ELSE w.window_ends_at END
            RETURNING subject, signups,
                      ceil(extract(epoch FROM window_ends_at - clock_timestamp()))::int
                          AS retry_after
            """,
            subjects,
            [float(limits.address_window_seconds), 3600.0],
        )
        for row in rows:
            if row["signups"] > allowed[row["subject"]]:
                # Raising rolls the transaction back: a refused signup is not counted.
                who = "this address" if row["subject"] != "all" else "the platform"
                raise TooManyRequests(
                    f"too many signups from {who} lately; try again later", row["retry_after"]
                )


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


@dataclass(frozen=True)
class LoginLimits:
    """How many failed logins a window allows, per email and per client address."""

    per_email: int
    per_address: int
    window_seconds: int


def login_subjects(email: str, address: str) -> list[str]:
    """The rows a login is counted under, always in this order (row locks never cross)."""
    return [address_subject(address), f"email:{email_key(email)}"]


async def reserve_login_attempt(
    conn: asyncpg.Connection, limits: LoginLimits, email: str, address: str
) -> None:
    """Count a login against the email and the address before its password is hashed, in one
    transaction: concurrent attempts take turns on the rows, so no more than the limit ever
    reach the hash. 429 with Retry-After, and nothing counted, when either is spent."""
    subjects = login_subjects(email, address)
    async with conn.transaction():
        rows = await conn.fetch(
            """
            INSERT INTO login_failures AS f (subject, window_started_at, failures)
            SELECT unnest($1::text[]), now(), 1
            ON CONFLICT (subject) DO UPDATE SET
                failures = CASE WHEN f.window_started_at < now() - make_interval(secs => $2)
                                THEN 1 ELSE f.failures + 1 END,
                window_started_at = CASE WHEN f.window_started_at
                                              < now() - make_interval(secs => $2)
                                         THEN now() ELSE f.window_started_at END
            RETURNING subject, failures,
                      ceil(extract(epoch FROM window_started_at + make_interval(secs => $2)
                                              - clock_timestamp()))::int AS retry_after
            """,
            subjects,
            float(limits.window_seconds),
        )
        for row in rows:
            is_email = row["subject"].startswith("email:")
            limit = limits.per_email if is_email else limits.per_address
            if row["failures"] > limit:
                raise TooManyRequests("too many failed logins; try again later", row["retry_after"])


async def forgive_login_attempt(conn: asyncpg.Connection, email: str, address: str) -> None:
    """A login that succeeded: the email starts afresh and the address does not count it."""
    address_row, email_row = login_subjects(email, address)
    await conn.execute("DELETE FROM login_failures WHERE subject = $1", email_row)
    await conn.execute(
        "UPDATE login_failures SET failures = failures - 1 WHERE subject = $1 AND failures > 0",
        address_row,
    )


# --- the service ---------------------------------------------------------------------------------


@dataclass
class SignupService:
    """Signup, login and the account view, over the signup schema and the log."""

    pool: asyncpg.Pool
    store: EventStore
    passwords: Passwords
    sessions: SessionTokens
    settings: SignupSettings

    @property
    def limits(self) -> LoginLimits:
        """Failed-login limits from the settings."""
        s = self.settings
        return LoginLimits(
            s.login_max_failures_per_email,
            s.login_max_failures_per_address,
            s.login_failure_window_seconds,
        )

    @property
    def signup_limits(self) -> SignupLimits:
        """Signup limits from the settings."""
        s = self.settings
        return SignupLimits(
            s.signup_max_per_address, s.signup_address_window_seconds, s.signup_max_per_hour
        )

    async def sign_up(self, form: SignupForm, address: str) -> SignupAnswer:
        """Open an account: the limits first, then the log decides who got the email first.

        A retry of a signup whose outcome the client never learned (the same email and
        password, with or without an Idempotency-Key) answers with that account, whether its
        event was stored the first time or is stored now.
        """
        await reserve_signup(self.pool, self.signup_limits, address)
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
        password_hash = await self.passwords.hash(form.password)
        envelope = traced_envelope(
            CustomerSignedUp(
                customer_id=customer_id,
                email=form.email,
                email_display=form.email_display,
                company_name=form.company_name,
                full_name=form.full_name,
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
            await self.store.append(
                envelope, key=email_key(form.email), expected_last_subject_seq=0
            )
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
        await self._confirm(customer_id)
        return customer_id

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
            await reserve_login_attempt(conn, self.limits, form.email, address)
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
            await self.store.append(envelope, key=email_key(email), expected_last_subject_seq=0)
        except ConcurrencyConflict:
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
        await self._confirm(customer_id)
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
            await reserve_login_attempt(conn, self.limits, form.email, address)
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

    async def _confirm(self, customer_id: str) -> None:
        await self.pool.execute(
            "UPDATE credentials SET confirmed = true, pending_envelope = NULL "
            "WHERE customer_id = $1 AND NOT confirmed",
            customer_id,
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

    async def log_in(
        self, form: LoginForm, address: str, relayed: RelayedClient | None = None
    ) -> LoginAnswer:
        """A session token for the right password; the same 401 for every wrong answer.

        ``address`` is the caller's; a sign-in an instance relayed with a valid signature
        (``relayed``) counts against the browser address it vouches for instead, once."""
        async with self.pool.acquire() as conn:
            if relayed is not None and await first_use_of_relay(conn, relayed.nonce):
                address = relayed.address
            await reserve_login_attempt(conn, self.limits, form.email, address)
            # In force: confirmed by the request that appended it, or proven by the account
            # the log made (the request may have died between the append and the confirm).
            row = await conn.fetchrow(
                "SELECT customer_id, password_hash FROM credentials c WHERE email = $1 "
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
            if account is not None and account["closed_at"] is not None:
                # A closed account answers (and counts) like a wrong password.
                raise Unauthorized("invalid email or password")
            await forgive_login_attempt(conn, form.email, address)
        return LoginAnswer(
            customer_id=row["customer_id"],
            email=form.email,
            license=license_of(account),
            token=self.sessions.issue(row["customer_id"], form.email),
            token_expires_in=self.sessions.ttl_seconds,
        )

    async def account(self, customer_id: str) -> AccountView:
        """The customer's account view, projected from every event about them."""
        row = await self.pool.fetchrow("SELECT * FROM accounts WHERE customer_id = $1", customer_id)
        if row is None:
            raise NotFound("no such account")
        now = _now()
        return AccountView(
            customer=CustomerOut(
                customer_id=row["customer_id"], email=row["email"], company_name=row["company_name"]
            ),
            full_name=row["full_name"],
            signed_up_at=row["signed_up_at"],
            subscription=subscription_of(row, now),
            license=license_of(row),
            deployment=deployment_of(row),
            closed_at=row["closed_at"],
        )


# --- idempotent retries ---------------------------------------------------------------------------


def request_fingerprint(form: SignupForm) -> str:
    """What makes two signups the same request (the password is left out: never stored)."""
    return hashlib.sha256(
        msgspec.json.encode([form.email, form.company_name, form.full_name])
    ).hexdigest()


async def claim_idempotency_key(
    pool: asyncpg.Pool, key: str, fingerprint: str
) -> tuple[int, Any] | None:
    """The stored answer for a retried key, or None after claiming a new key for this request."""
    inserted = await pool.fetchval(
        "INSERT INTO idempotency_keys (key, request_hash) VALUES ($1, $2) "
        "ON CONFLICT (key) DO NOTHING RETURNING true",
        key,
        fingerprint,
    )
    if inserted:
        return None
    row = await pool.fetchrow(
        "SELECT request_hash, status_code, response FROM idempotency_keys WHERE key = $1", key
    )
    if row is None:  # released in between: claim again
        return await claim_idempotency_key(pool, key, fingerprint)
    if row["request_hash"] != fingerprint:
        raise IdempotencyMismatch("this Idempotency-Key was used for a different signup")
    if row["status_code"] is None:
        raise Conflict("a signup with this Idempotency-Key is still in progress")
    return int(row["status_code"]), msgspec.json.decode(row["response"])


async def remember_answer(pool: asyncpg.Pool, key: str, status: int, body: Any) -> None:
    """Keep the answer given to a keyed request, for its retries."""
    await pool.execute(
        "UPDATE idempotency_keys SET status_code = $2, response = $3::jsonb WHERE key = $1",
        key,
        status,
        msgspec.json.encode(body).decode(),
    )


async def release_idempotency_key(pool: asyncpg.Pool, key: str) -> None:
    """Forget a key whose request failed for a passing reason, so a retry runs again."""
    await pool.execute("DELETE FROM idempotency_keys WHERE key = $1 AND status_code IS NULL", key)


async def settle_credentials(pool: asyncpg.Pool) -> int:
    """Confirm every credential whose customer the log has an account for, and drop the ones
    of signups that lost their email to another customer. Returns how many rows changed."""
    async with pool.acquire() as conn, conn.transaction():
        confirmed = await conn.fetch(
            "UPDATE credentials c SET confirmed = true, pending_envelope = NULL FROM accounts a "
            "WHERE a.customer_id = c.customer_id AND NOT c.confirmed RETURNING c.customer_id"
        )
        lost = await conn.fetch(
            "DELETE FROM credentials c WHERE NOT confirmed AND EXISTS (SELECT 1 FROM accounts a "
            "WHERE a.email = c.email AND a.customer_id <> c.customer_id) RETURNING customer_id"
        )
    return len(confirmed) + len(lost)


async def forget_stale_private_state(
    pool: asyncpg.Pool, login_window_seconds: int, idempotency_hours: int = 24
) -> None:
    """Drop failed-login and signup windows that ended, relay nonces too old to be believed
    anyway, and idempotency answers older than a day."""
    await pool.execute(
        "DELETE FROM login_failures WHERE window_started_at < now() - make_interval(secs => $1)",
        float(login_window_seconds),
    )
    await pool.execute("DELETE FROM signup_windows WHERE window_ends_at < now()")
    await pool.execute(
        "DELETE FROM login_relay_nonces WHERE seen_at < now() - make_interval(secs => $1)",
        float(RELAY_NONCE_KEEP_SECONDS),
    )
    await pool.execute(
        "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(hours => $1)",
        idempotency_hours,
    )
