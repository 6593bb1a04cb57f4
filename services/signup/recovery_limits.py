"""Limits of the mails a client may make signup send: counted like signups (``limits.py``), in
the same ``signup_windows`` table under subjects of their own, so every replica sees the same
counts and the sweeper forgets ended windows."""

from __future__ import annotations

import asyncpg

from libs.http.app import address_subject
from libs.http.errors import TooManyRequests
from services.signup.limits import email_key


async def count_in_window(
    conn: asyncpg.Connection, subject: str, window_seconds: float
) -> tuple[int, int]:
    """Count one more under ``subject`` in its window; (the count, seconds left of it)."""
    row = await conn.fetchrow(
        """
        INSERT INTO signup_windows AS w (subject, window_ends_at, signups)
        VALUES ($1, now() + make_interval(secs => $2), 1)
        ON CONFLICT (subject) DO UPDATE SET
            signups = CASE WHEN w.window_ends_at <= now() THEN 1 ELSE w.signups + 1 END,
            window_ends_at = CASE WHEN w.window_ends_at <= now()
                                  THEN EXCLUDED.window_ends_at ELSE w.window_ends_at END
        RETURNING signups,
                  greatest(ceil(extract(epoch FROM window_ends_at - clock_timestamp())), 1)::int
                      AS retry_after
        """,
        subject,
        window_seconds,
    )
    assert row is not None
    return int(row["signups"]), int(row["retry_after"])


async def reserve_from_address(
    conn: asyncpg.Connection, what: str, address: str, limit: int, window_seconds: float
) -> None:
    """Count a ``what`` request against the client address; 429 past ``limit``."""
    count, retry_after = await count_in_window(
        conn, f"{what}:{address_subject(address)}", window_seconds
    )
    if count > limit:
        raise TooManyRequests(
            "too many requests from this address lately; try again later", retry_after
        )


async def within_email_limit(
    conn: asyncpg.Connection, what: str, email: str, limit: int, window_seconds: float
) -> bool:
    """Count a ``what`` mail to ``email``; False once past ``limit`` in the window."""
    count, _ = await count_in_window(conn, f"{what}:email:{email_key(email)}", window_seconds)
    return count <= limit


async def reserve_for_customer(
    conn: asyncpg.Connection, what: str, customer_id: str, limit: int, window_seconds: float
) -> None:
    """Count a ``what`` request of a signed-in customer; 429 past ``limit``."""
    count, retry_after = await count_in_window(
        conn, f"{what}:customer:{customer_id}", window_seconds
    )
    if count > limit:
        raise TooManyRequests("asked too often lately; try again later", retry_after)
