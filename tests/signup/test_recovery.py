"""Forgotten passwords, email verification and closing an account through the JSON API, on
real Postgres and JetStream, with mail read where an operator reads it: ``iotistic mail tail``
(no SMTP host is set, so each mail is written to the log and kept in signup's outbox)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from contracts import decode_envelope
from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.runtime.platform import Platform
from services.billing.app import BILLING
from services.licensing.app import LICENSING
from services.signup.app import SIGNUP
from services.targets import build_app
from support import SUITE_SIGNUP_LIMITS, eventually, license_keys_dir, serving

PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "a quite different phrase"
PUBLIC_URL = "https://api.iotistic.example"
IOTISTIC = str(Path(sys.executable).parent / "iotistic")


@pytest.fixture(scope="module")
async def platform(settings: ServiceSettings, store: EventStore) -> Platform:
    return Platform.from_settings(
        settings,
        [SIGNUP, LICENSING, BILLING],
        license_keys_dir=license_keys_dir(),
        argon2_memory_kib=8192,
        argon2_time_cost=1,
        public_url=PUBLIC_URL,
        reset_links_max_per_address=40,
        **SUITE_SIGNUP_LIMITS,
    )


@pytest.fixture(scope="module")
async def client(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(build_app(platform, "all")) as http:
        await platform.wait_started()
        yield http


_counter = iter(range(10**6))


def new_email() -> str:
    return f"recover.{next(_counter)}.{datetime.now(UTC).timestamp():.0f}@example.com"


async def sign_up(client: httpx.AsyncClient, email: str) -> str:
    body = {"email": email, "password": PASSWORD, "company_name": "Acme Air"}
    response = await client.post("/api/customers/signup", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["customer"]["customer_id"])


async def log_in(client: httpx.AsyncClient, email: str, password: str) -> httpx.Response:
    return await client.post("/api/customers/login", json={"email": email, "password": password})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def mail_tail(settings: ServiceSettings, *args: str) -> str:
    """What ``iotistic mail tail`` prints, run as an operator would."""
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "IOTISTIC_DATA_DIR": "/nonexistent",
    }
    result = subprocess.run(
        [IOTISTIC, "mail", "tail", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


async def links_to(platform: Platform, email: str, path: str) -> list[str]:
    """The links of ``path`` in the mails written to ``email``, oldest first (from the outbox)."""
    rows = (
        await platform.runtime_of("signup")
        .db()
        .fetch(
            "SELECT body FROM mail_outbox WHERE recipient = $1 AND sent_at IS NOT NULL ORDER BY id",
            email,
        )
    )
    pattern = re.compile(re.escape(PUBLIC_URL + path) + r"\?token=[A-Za-z0-9_-]+")
    return [m for row in rows for m in pattern.findall(row["body"] or "")]


async def mailed_link(platform: Platform, email: str, path: str, count: int = 1) -> str:
    found = await eventually(
        lambda: links_to(platform, email, path),
        lambda links: len(links) >= count,
        what=f"mail #{count} with a {path} link to {email}",
    )
    return found[count - 1]


def body_of(envelope: Any) -> dict[str, Any]:
    """An event's body as the log holds it."""
    return dict(msgspec.json.decode(envelope.data))


def token_of(link: str) -> str:
    return link.partition("?token=")[2]


async def events_of(store: EventStore, event_type: str, customer_id: str) -> list[Any]:
    found = []
    async for stored in store.read(event_types=[event_type]):
        envelope = decode_envelope(stored.data)
        if envelope.customer_id == customer_id:
            found.append(envelope)
    return found


async def test_the_whole_reset_through_the_mail_the_cli_shows(
    client, platform, settings, store
) -> None:
    email = new_email()
    customer_id = await sign_up(client, email)
    old_session = (await log_in(client, email, PASSWORD)).json()["token"]
    assert (await client.get("/api/customers/me", headers=bearer(old_session))).status_code == 200

    # Asked with a Host header of someone else's: the link is on PUBLIC_URL all the same.
    asked = await client.post(
        "/api/customers/password-reset", json={"email": email}, headers={"Host": "evil.example"}
    )
    assert asked.status_code == 202, asked.text
    await mailed_link(platform, email, "/reset")
    printed = mail_tail(settings, "-n", "50")
    assert f"To: {email}" in printed
    assert "Subject: Reset your Iotistic password" in printed
    links = re.findall(re.escape(PUBLIC_URL) + r"/reset\?token=[A-Za-z0-9_-]+", printed)
    assert links and "evil.example" not in printed

    done = await client.post(
        "/api/customers/password-reset/confirm",
        json={"token": token_of(links[-1]), "password": NEW_PASSWORD},
    )
    assert done.status_code == 200, done.text
    new_session = done.json()["token"]
    assert done.json()["customer_id"] == customer_id

    assert (await log_in(client, email, PASSWORD)).status_code == 401
    assert (await log_in(client, email, NEW_PASSWORD)).status_code == 200
    me = await client.get("/api/customers/me", headers=bearer(old_session))
    assert me.status_code == 401
    assert (await client.get("/api/customers/me", headers=bearer(new_session))).status_code == 200
    changed = await eventually(
        lambda: events_of(store, "CredentialsChanged", customer_id), what="CredentialsChanged"
    )
    assert len(changed) == 1
    # Only who and when: no password, hash or token travels.
    assert set(body_of(changed[0])) == {"customer_id", "changed_at", "sessions_valid_from"}


async def test_a_retried_confirm_finds_its_first_answer_and_a_used_link_nothing_more(
    client, platform
) -> None:
    email = new_email()
    await sign_up(client, email)
    await client.post("/api/customers/password-reset", json={"email": email})
    token = token_of(await mailed_link(platform, email, "/reset"))
    body = {"token": token, "password": NEW_PASSWORD}
    first = await client.post("/api/customers/password-reset/confirm", json=body)
    assert first.status_code == 200, first.text
    # The answer was lost; the client sends the same again: signed in, not locked out.
    again = await client.post("/api/customers/password-reset/confirm", json=body)
    assert again.status_code == 200, again.text
    assert (await client.get("/api/customers/me", headers=bearer(again.json()["token"]))).is_success
    # The used link sets no other password.
    other = await client.post(
        "/api/customers/password-reset/confirm",
        json={"token": token, "password": "yet another long phrase"},
    )
    assert other.status_code == 400
    assert other.json()["error"]["fields"][0]["field"] == "token"
    assert (await log_in(client, email, NEW_PASSWORD)).status_code == 200


async def test_expired_forged_and_superseded_links_are_refused(client, platform) -> None:
    email = new_email()
    await sign_up(client, email)
    for _ in range(2):
        assert (
            await client.post("/api/customers/password-reset", json={"email": email})
        ).status_code == 202
    first = token_of(await mailed_link(platform, email, "/reset", 1))
    second = token_of(await mailed_link(platform, email, "/reset", 2))

    async def confirm(token: str, password: str = NEW_PASSWORD) -> httpx.Response:
        return await client.post(
            "/api/customers/password-reset/confirm", json={"token": token, "password": password}
        )

    forged = await confirm("A" * 43)
    assert forged.status_code == 400
    assert forged.json()["error"]["fields"][0]["field"] == "token"
    assert (await confirm("not a token!")).status_code == 400
    weak = await confirm(second, "password1")
    assert weak.status_code == 400
    assert weak.json()["error"]["fields"] == [
        {"field": "password", "reason": "is too common; choose another"}
    ]
    assert (await confirm(second)).status_code == 200
    # Setting the password spent every other link of the customer.
    assert (await confirm(first, "another phrase entirely")).status_code == 400

    await client.post("/api/customers/password-reset", json={"email": email})
    third = token_of(await mailed_link(platform, email, "/reset", 3))
    await (
        platform.runtime_of("signup")
        .db()
        .execute(
            "UPDATE account_tokens SET expires_at = now() - interval '1 second' "
            "WHERE purpose = 'reset_password' AND used_at IS NULL AND email = $1",
            email,
        )
    )
    assert (await confirm(third, "another phrase entirely")).status_code == 400
    assert (await log_in(client, email, NEW_PASSWORD)).status_code == 200


async def test_asking_tells_nobody_whether_an_account_exists(client, platform) -> None:
    email = new_email()
    await sign_up(client, email)
    known = await client.post("/api/customers/password-reset", json={"email": email})
    unknown = await client.post("/api/customers/password-reset", json={"email": new_email()})
    assert known.status_code == unknown.status_code == 202
    assert known.json() == unknown.json()
    assert known.headers.get("content-length") == unknown.headers.get("content-length")
    bad = await client.post("/api/customers/password-reset", json={"email": "nope"})
    assert bad.status_code == 400
    assert bad.json()["error"]["fields"][0]["field"] == "email"


async def test_one_mailbox_gets_a_few_links_an_hour_and_no_more(client, platform) -> None:
    email = new_email()
    await sign_up(client, email)
    for _ in range(5):
        answer = await client.post("/api/customers/password-reset", json={"email": email})
        assert answer.status_code == 202
    await mailed_link(platform, email, "/reset", 3)
    pool = platform.runtime_of("signup").db()
    count = await pool.fetchval("SELECT count(*) FROM mail_outbox WHERE recipient = $1", email)
    assert count == 1 + 3  # the verification mail, and three reset mails of five asked


async def test_signup_mails_a_verification_link_that_verifies_once(client, platform, store) -> None:
    email = new_email()
    customer_id = await sign_up(client, email)
    session = (await log_in(client, email, PASSWORD)).json()["token"]
    me = await client.get("/api/customers/me", headers=bearer(session))
    assert me.json()["email_verified"] is False  # and the account works meanwhile
    link = await mailed_link(platform, email, "/verify")
    assert link.startswith(f"{PUBLIC_URL}/verify?token=")
    opened = await client.get("/verify", params={"token": token_of(link)})
    assert opened.status_code == 200
    assert "verified" in opened.text
    await eventually(
        lambda: client.get("/api/customers/me", headers=bearer(session)),
        lambda r: r.json()["email_verified"] is True,
        what="email_verified in the account view",
    )
    again = await client.get("/verify", params={"token": token_of(link)})
    assert "used already" in again.text
    assert (await client.get("/verify", params={"token": "B" * 43})).status_code == 400
    assert len(await events_of(store, "EmailVerified", customer_id)) == 1
    resent = await client.post("/api/customers/me/verification", headers=bearer(session))
    assert resent.status_code == 202
    assert resent.json()["email_verified"] is True


async def test_verification_mails_again_on_request_a_few_times(client, platform) -> None:
    email = new_email()
    await sign_up(client, email)
    session = (await log_in(client, email, PASSWORD)).json()["token"]
    assert (await client.post("/api/customers/me/verification")).status_code == 401
    statuses = [
        (await client.post("/api/customers/me/verification", headers=bearer(session))).status_code
        for _ in range(4)
    ]
    assert statuses == [202, 202, 202, 429]
    await mailed_link(platform, email, "/verify", 4)


async def test_closing_needs_the_password_and_happens_once(client, platform, store) -> None:
    email = new_email()
    customer_id = await sign_up(client, email)
    session = (await log_in(client, email, PASSWORD)).json()["token"]
    headers = bearer(session)
    assert (
        await client.post("/api/customers/me/close", json={"password": PASSWORD})
    ).status_code == 401
    wrong = await client.post(
        "/api/customers/me/close", json={"password": "not it at all"}, headers=headers
    )
    assert wrong.status_code == 400
    assert wrong.json()["error"]["fields"] == [
        {"field": "password", "reason": "is not your current password"}
    ]
    bad = await client.post(
        "/api/customers/me/close",
        json={"password": PASSWORD, "erase": "yes", "reason": "x" * 501, "extra": 1},
        headers=headers,
    )
    assert {f["field"] for f in bad.json()["error"]["fields"]} == {"erase", "reason", "extra"}
    body = {"password": PASSWORD, "erase": True, "reason": "moving on"}
    closed = await client.post("/api/customers/me/close", json=body, headers=headers)
    assert closed.status_code == 200, closed.text
    # The answer was lost: the retry hears the same outcome, and nothing more happens.
    again = await client.post("/api/customers/me/close", json=body, headers=headers)
    assert again.status_code == 200
    assert again.json() == closed.json()
    assert closed.json()["erase"] is True

    # Closed with erasure: the email names no account any more (not even a closed one).
    refused = await log_in(client, email, PASSWORD)
    assert refused.status_code == 401
    assert (await client.get("/api/customers/me", headers=headers)).status_code == 401
    events = await eventually(
        lambda: events_of(store, "CustomerClosed", customer_id), what="CustomerClosed"
    )
    assert len(events) == 1
    event = body_of(events[0])
    assert event["closed_by"] == "customer" and event["erase"] is True
    # A closed account gets no reset link.
    await client.post("/api/customers/password-reset", json={"email": email})
    assert await links_to(platform, email, "/reset") == []


async def test_a_paid_subscription_is_canceled_before_the_account_closes(client, platform) -> None:
    email = new_email()
    customer_id = await sign_up(client, email)
    headers = bearer((await log_in(client, email, PASSWORD)).json()["token"])
    pool = platform.runtime_of("signup").db()
    set_status = "UPDATE accounts SET subscription_status = $2 WHERE customer_id = $1"
    await pool.execute(set_status, customer_id, "active")
    body = {"password": PASSWORD}
    refused = await client.post("/api/customers/me/close", json=body, headers=headers)
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "subscription_active"
    assert (await log_in(client, email, PASSWORD)).status_code == 200
    await pool.execute(set_status, customer_id, "canceled")
    closed = await client.post("/api/customers/me/close", json=body, headers=headers)
    assert closed.status_code == 200
    assert closed.json()["erase"] is False


async def test_one_address_asking_for_many_links_is_told_to_wait(client) -> None:
    statuses = []
    for _ in range(45):
        answer = await client.post("/api/customers/password-reset", json={"email": new_email()})
        statuses.append(answer.status_code)
        if answer.status_code == 429:
            assert int(answer.headers["Retry-After"]) >= 1
            break
    assert statuses[-1] == 429
