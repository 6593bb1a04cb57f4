"""Signup's private state kept in line with the log, and trimmed: what its workers do.

Credentials follow the accounts the log made (``settle_credentials``); rate-limit windows,
relay nonces and idempotency answers are forgotten once past their use.
"""

from __future__ import annotations

import asyncpg

from services.signup.logins import RELAY_NONCE_KEEP_SECONDS


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
