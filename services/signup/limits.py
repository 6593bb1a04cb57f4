"""Abuse limits: how many signups a client address and the platform may make in a window, and
how many failed logins an email and an address may have, counted in Postgres so every replica
sees the same count (ARCHITECTURE.md: every shared resource has a limit a caller is told about).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import asyncpg

from libs.http.app import address_subject
from libs.http.errors import TooManyRequests
from services.signup.settings import SignupSettings


def email_key(email: str) -> str:
    """The subject key of an email: first writer on it owns the email (no PII in subjects)."""
    return hashlib.sha256(email.encode()).hexdigest()[:40]


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


def login_limits(settings: SignupSettings) -> LoginLimits:
    """Failed-login limits from the settings."""
    return LoginLimits(
        settings.login_max_failures_per_email,
        settings.login_max_failures_per_address,
        settings.login_failure_window_seconds,
    )


def signup_limits(settings: SignupSettings) -> SignupLimits:
    """Signup limits from the settings."""
    return SignupLimits(
        settings.signup_max_per_address,
        settings.signup_address_window_seconds,
        settings.signup_max_per_hour,
    )
