"""Signups whose client never learned the outcome: the log stalled after taking the event, the
connection was cut before the event arrived, or NATS was gone. Issue 12 found customers locked
out for good (login 401, a retry 409) after such faults. Signup, licensing and billing run here
over a TCP relay in front of the real NATS server, which makes each fault happen for real.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from tcp_relay import TcpRelay

from contracts import decode_envelope
from libs.config import ServiceSettings
from libs.db.postgres import create_pool
from libs.eventlog.store import EventStore
from libs.runtime.platform import Platform
from libs.sealing.vault import master_key
from services.billing.app import BILLING
from services.licensing.app import LICENSING
from services.signup.app import SIGNUP
from services.signup.private_state import settle_credentials
from services.targets import build_app
from support import SUITE_SIGNUP_LIMITS, eventually, license_keys_dir, serving

PASSWORD = "correct horse battery staple"


@dataclass
class Plane:
    client: httpx.AsyncClient
    relay: TcpRelay
    store: EventStore
    signup_db: asyncpg.Pool

    async def sign_up(self, email: str, password: str = PASSWORD) -> httpx.Response:
        body = {"email": email, "password": password, "company_name": "Fault Air"}
        return await self.client.post("/api/customers/signup", json=body)

    async def log_in(self, email: str, password: str = PASSWORD) -> httpx.Response:
        body = {"email": email, "password": password}
        return await self.client.post("/api/customers/login", json=body)

    def subject_of(self, email: str) -> str:
        """The subject a signup with ``email`` is appended to (no consumer request names it)."""
        return self.store.subject(
            "CustomerSignedUp",
            master_key(self.store.settings.data_keys_master_key).email_subject(email),
        )

    async def signups_on_log(self, email: str) -> int:
        subject = self.subject_of(email)
        return (await self.store.count_by_subject(subject)).get(subject, 0)

    async def credentials(self, email: str) -> list[dict[str, Any]]:
        rows = await self.signup_db.fetch(
            "SELECT customer_id, confirmed, pending_envelope FROM credentials WHERE email = $1",
            email,
        )
        return [dict(r) for r in rows]


@pytest.fixture(scope="module")
async def plane(settings: ServiceSettings, store: EventStore) -> AsyncIterator[Plane]:
    async with TcpRelay(settings.nats_url) as relay:
        platform = Platform.from_settings(
            msgspec.structs.replace(settings, nats_url=relay.url),
            [SIGNUP, LICENSING, BILLING],
            license_keys_dir=license_keys_dir(),
            argon2_memory_kib=8192,
            argon2_time_cost=1,
            **SUITE_SIGNUP_LIMITS,
        )
        pool = await create_pool(settings.database_url, "signup")
        try:
            async with serving(build_app(platform, "all")) as client:
                await platform.wait_started()
                yield Plane(client, relay, store, pool)
        finally:
            await pool.close()


async def ready(plane: Plane) -> None:
    await eventually(
        lambda: plane.client.get("/health/ready"),
        lambda r: r.status_code == 200,
        timeout=30,
        what="the platform ready again",
    )


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


async def test_a_signup_stored_while_its_answer_was_lost_can_log_in_and_be_retried(
    plane: Plane,
) -> None:
    email = "stalled@example.com"
    # NATS takes the event, but nothing it says reaches the service: the append times out.
    plane.relay.hold()
    try:
        failed = await plane.sign_up(email)
        assert failed.status_code == 503, failed.text
        assert await plane.signups_on_log(email) == 1
    finally:
        plane.relay.release()
    # No operator action: once the account view has the customer (a wrong try would count
    # against the login limit, so wait for that, not for a login) ...
    await eventually(
        lambda: plane.signup_db.fetchval("SELECT 1 FROM accounts WHERE email = $1", email),
        what="the account view to show the stored signup",
    )
    # ... the customer signs in with the password they chose ...
    login = await plane.log_in(email)
    assert login.status_code == 200, login.text
    customer_id = login.json()["customer_id"]
    # ... and the client's retry is answered with that account, not with 409.
    retried = await plane.sign_up(email)
    assert retried.status_code == 201, retried.text
    assert retried.json()["customer"]["customer_id"] == customer_id
    # Someone else's password on that email is still refused, and nothing was appended twice.
    other = await plane.sign_up(email, "another long passphrase")
    assert other.status_code == 409 and error_code(other) == "conflict", other.text
    assert await plane.signups_on_log(email) == 1
    assert [c["confirmed"] for c in await plane.credentials(email)] == [True]


async def test_a_signup_lost_on_the_way_is_appended_by_its_retry_with_its_first_event(
    plane: Plane,
) -> None:
    email = "cut@example.com"
    # The connection dies as the event goes out: NATS never sees it, the service cannot know.
    plane.relay.cut_client_at(plane.subject_of(email).encode())
    failed = await plane.sign_up(email)
    assert failed.status_code == 503, failed.text
    assert plane.relay.cut.is_set()
    await ready(plane)
    assert await plane.signups_on_log(email) == 0
    [pending] = await plane.credentials(email)
    assert not pending["confirmed"] and pending["pending_envelope"] is not None
    assert (await plane.log_in(email)).status_code == 401  # nothing on the log: no account
    # The client retries later with the same details: the very event it sent is appended.
    await plane.signup_db.execute(
        "UPDATE credentials SET created_at = now() - interval '1 minute' WHERE email = $1", email
    )
    retried = await plane.sign_up(email)
    assert retried.status_code == 201, retried.text
    assert retried.json()["customer"]["customer_id"] == pending["customer_id"]
    assert await plane.signups_on_log(email) == 1
    stored = await plane.store.js.get_last_msg(plane.store.stream, plane.subject_of(email))
    sent = decode_envelope(pending["pending_envelope"])
    assert decode_envelope(stored.data or b"").event_id == sent.event_id
    assert (await plane.log_in(email)).status_code == 200


async def test_a_lost_signup_retried_with_another_password_leaves_nothing_behind(
    plane: Plane,
) -> None:
    email = "changed-mind@example.com"
    plane.relay.cut_client_at(plane.subject_of(email).encode())
    assert (await plane.sign_up(email)).status_code == 503
    await ready(plane)
    [lost] = await plane.credentials(email)
    # A new signup with another password takes the email; the lost one can never be stored.
    fresh = await plane.sign_up(email, "a different passphrase")
    assert fresh.status_code == 201, fresh.text
    owner = fresh.json()["customer"]["customer_id"]
    assert owner != lost["customer_id"]
    await eventually(
        lambda: plane.signup_db.fetchval("SELECT 1 FROM accounts WHERE customer_id = $1", owner),
        what="the account view to show the new customer",
    )
    assert await settle_credentials(plane.signup_db) == 1
    assert [c["customer_id"] for c in await plane.credentials(email)] == [owner]
    assert (await plane.log_in(email)).status_code == 401
    assert (await plane.log_in(email, "a different passphrase")).status_code == 200


async def test_a_signup_refused_by_an_absent_log_leaves_nothing_behind(plane: Plane) -> None:
    email = "nats-away@example.com"
    plane.relay.go_down()
    try:
        await eventually(
            lambda: plane.client.get("/health/ready"),
            lambda r: r.status_code == 503,
            what="readiness to see NATS gone",
        )
        failed = await plane.sign_up(email)
        assert failed.status_code == 503, failed.text
        # Certainly not stored, so nothing is kept: no credential waits for a retry.
        assert await plane.credentials(email) == []
    finally:
        plane.relay.come_back()
    await ready(plane)
    again = await plane.sign_up(email, "chosen again, differently")
    assert again.status_code == 201, again.text
    assert await plane.signups_on_log(email) == 1


async def test_credentials_of_a_stored_signup_are_confirmed_from_the_account_view(
    plane: Plane,
) -> None:
    # The state a kill -9 between the append and the confirm used to leave, made directly:
    # the account exists on the log, its credential was never marked.
    email = "killed-before-confirm@example.com"
    created = await plane.sign_up(email)
    assert created.status_code == 201
    customer_id = created.json()["customer"]["customer_id"]
    await plane.signup_db.execute(
        "UPDATE credentials SET confirmed = false WHERE customer_id = $1", customer_id
    )
    await eventually(
        lambda: plane.signup_db.fetchval(
            "SELECT 1 FROM accounts WHERE customer_id = $1", customer_id
        ),
        what="the account view to show the customer",
    )
    assert (await plane.log_in(email)).status_code == 200
    assert await settle_credentials(plane.signup_db) == 1
    assert [c["confirmed"] for c in await plane.credentials(email)] == [True]


async def test_readiness_says_when_the_log_refuses_appends(plane: Plane) -> None:
    # A stream at its limits (as a full disk does) refuses appends: the service must not look
    # ready while it cannot take a signup, and must by itself once it can again.
    js = plane.store.js
    config = (await js.stream_info(plane.store.stream)).config
    full = (await js.stream_info(plane.store.stream)).state.messages
    await js.update_stream(dataclasses.replace(config, max_msgs=full))
    try:
        refused = await plane.sign_up("log-full@example.com")
        assert refused.status_code == 503, refused.text
        health = await plane.client.get("/health/ready")
        assert health.status_code == 503
        log = health.json()["services"]["signup"]["log"]
        assert log["ok"] is False and "refuses" in log["error"], log
        assert await plane.credentials("log-full@example.com") == []
    finally:
        await js.update_stream(dataclasses.replace(config, max_msgs=-1))
    again = await plane.sign_up("log-full@example.com")
    assert again.status_code == 201, again.text
    await ready(plane)


async def test_a_signup_lost_long_ago_is_not_replayed_with_its_old_time(plane: Plane) -> None:
    # Review of issue 12: replaying a try from weeks ago would sign the customer up at that
    # time, with a trial already over. Past the duplicate window a retry is a new signup.
    email = "lost-long-ago@example.com"
    plane.relay.cut_client_at(plane.subject_of(email).encode())
    assert (await plane.sign_up(email)).status_code == 503
    await ready(plane)
    [stale] = await plane.credentials(email)
    await plane.signup_db.execute(
        "UPDATE credentials SET created_at = now() - interval '20 minutes' WHERE email = $1", email
    )
    retried = await plane.sign_up(email)
    assert retried.status_code == 201, retried.text
    customer_id = retried.json()["customer"]["customer_id"]
    assert customer_id != stale["customer_id"]
    stored = await plane.store.js.get_last_msg(plane.store.stream, plane.subject_of(email))
    envelope = decode_envelope(stored.data or b"")
    assert envelope.customer_id == customer_id
    assert envelope.event_id != decode_envelope(stale["pending_envelope"]).event_id
    await eventually(
        lambda: plane.signup_db.fetchval(
            "SELECT 1 FROM accounts WHERE customer_id = $1", customer_id
        ),
        what="the account view to show the new signup",
    )
    assert await settle_credentials(plane.signup_db) == 1
    assert [c["customer_id"] for c in await plane.credentials(email)] == [customer_id]
