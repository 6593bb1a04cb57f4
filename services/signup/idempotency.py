"""Idempotent signups: a retry with the same ``Idempotency-Key`` gets the first answer.

The key is claimed before the signup runs; its answer (a 201, or a refusal such as a 409) is
kept for a day and given to every retry. A signup that failed for a passing reason (a 5xx, a
429) releases its key, so a retry runs again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import msgspec

from libs.http.errors import Conflict, DomainError, InvalidRequest, TooManyRequests, error_body
from services.signup.models import SignupAnswer, SignupForm


class IdempotencyMismatch(DomainError):
    """422: an Idempotency-Key reused for a different request."""

    status_code = 422
    code = "idempotency_key_reused"


async def answer_once(
    pool: asyncpg.Pool, key: str, form: SignupForm, sign_up: Callable[[], Awaitable[SignupAnswer]]
) -> tuple[int, Any]:
    """The status and body of the signup ``form`` keyed ``key``: the first answer given to
    that key if there was one, else ``sign_up()``'s, kept for the key's retries."""
    if not key.isprintable() or not key.strip():
        raise InvalidRequest(
            "invalid request",
            fields=[{"field": "Idempotency-Key", "reason": "must be printable text"}],
        )
    # A retry of a signup that was answered gets that answer, before any limit is counted.
    stored = await claim_idempotency_key(pool, key, request_fingerprint(form))
    if stored is not None:
        return stored
    try:
        answer = await sign_up()
    except DomainError as exc:
        if exc.status_code >= 500 or isinstance(exc, TooManyRequests):
            # Passing: a retry (after Retry-After) runs again.
            await release_idempotency_key(pool, key)
        else:  # a refusal is the answer; a retry gets it again
            body = error_body(exc.status_code, exc.code, exc.message)
            await remember_answer(pool, key, exc.status_code, body)
        raise
    except BaseException:
        await release_idempotency_key(pool, key)
        raise
    await remember_answer(pool, key, 201, msgspec.to_builtins(answer))
    return 201, answer


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
