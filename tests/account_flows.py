"""What a customer does to their account through signup's real API, for the tests of what the
other services make of it: sign up, sign in, reset the password through the mailed link (read
from signup's mail outbox, where an operator's ``iotistic mail tail`` reads it), close."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import httpx

from libs.runtime.platform import Platform
from support import eventually

PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "a quite different phrase"
PUBLIC_URL = "https://api.iotistic.example"
# What every service answers for a session it does not honour, whatever the reason.
SESSION_REFUSED = "a valid session token is required"

_counter = iter(range(10**6))


def new_email(label: str) -> str:
    return f"{label}.{next(_counter)}.{datetime.now(UTC).timestamp():.0f}@example.com"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def sign_up(client: httpx.AsyncClient, email: str) -> str:
    body = {"email": email, "password": PASSWORD, "company_name": "Closing Air"}
    response = await client.post("/api/customers/signup", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["customer"]["customer_id"])


async def log_in(client: httpx.AsyncClient, email: str) -> str:
    response = await client.post(
        "/api/customers/login", json={"email": email, "password": PASSWORD}
    )
    assert response.status_code == 200, response.text
    return str(response.json()["token"])


async def reset_password(client: httpx.AsyncClient, platform: Platform, email: str) -> str:
    """Reset the password through the mailed link; the new session signup answers with."""
    asked = await client.post("/api/customers/password-reset", json={"email": email})
    assert asked.status_code == 202, asked.text
    pattern = re.compile(re.escape(PUBLIC_URL + "/reset") + r"\?token=([A-Za-z0-9_-]+)")

    async def links() -> list[str]:
        rows = (
            await platform.runtime_of("signup")
            .db()
            .fetch(
                "SELECT body FROM mail_outbox WHERE recipient = $1 AND sent_at IS NOT NULL", email
            )
        )
        return [m for row in rows for m in pattern.findall(row["body"] or "")]

    found = await eventually(links, bool, what=f"a reset link mailed to {email}")
    done = await client.post(
        "/api/customers/password-reset/confirm",
        json={"token": found[-1], "password": NEW_PASSWORD},
    )
    assert done.status_code == 200, done.text
    return str(done.json()["token"])


async def close_account(client: httpx.AsyncClient, session: str) -> None:
    closed = await client.post(
        "/api/customers/me/close", json={"password": PASSWORD}, headers=bearer(session)
    )
    assert closed.status_code == 200, closed.text
