"""Issue 11's abuse attacks, each run as the attacker ran it, against the real app over HTTP on
real Postgres and JetStream: floods of signups from one address and from many, a race of wrong
passwords, a spoofed X-Forwarded-For, a forged or replayed dashboard address assertion, and one
tenant's bad tries locking another tenant's dashboard sign-in (real instances, local backend).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient

from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.runtime.platform import Platform
from libs.sealing.vault import master_key
from libs.servers.mosquitto import EmbeddedMosquitto
from services.signup.app import SIGNUP
from services.targets import CONTROL_PLANE, build_app
from support import (
    create_database,
    eventually,
    local_backend_settings,
    make_settings,
    serving,
)

PASSWORD = "a long passphrase"
RELAY_SECRET = "relay-secret-" + "s" * 32


@dataclass
class ControlPlane:
    client: httpx.AsyncClient
    store: EventStore
    database_url: str

    async def signed_up_subjects(self) -> dict[str, int]:
        return await self.store.count_by_subject(self.store.filter_for(["CustomerSignedUp"])[0])

    async def counted(self, table: str, column: str) -> dict[str, int]:
        conn = await asyncpg.connect(self.database_url)
        try:
            rows = await conn.fetch(f"SELECT subject, {column} AS n FROM signup.{table}")
        finally:
            await conn.close()
        return {r["subject"]: r["n"] for r in rows}


Plane = Callable[..., contextlib.AbstractAsyncContextManager[ControlPlane]]


@pytest.fixture
def plane(postgres_server_url: str, nats_url: str, nc: NatsClient) -> Plane:
    """Starts the signup service alone on a database and stream of its own, with the signup
    settings given (production defaults otherwise), served by uvicorn as in production."""

    @contextlib.asynccontextmanager
    async def start(**signup: object) -> AsyncIterator[ControlPlane]:
        settings = make_settings(await create_database(postgres_server_url), nats_url)
        store = EventStore(nc.jetstream(), settings)
        await store.ensure_stream()
        platform = Platform.from_settings(
            settings,
            [SIGNUP],
            argon2_memory_kib=8192,
            argon2_time_cost=1,
            signup_wait_ms=0,  # no licensing here to wait for
            **signup,
        )
        try:
            async with serving(build_app(platform, "all")) as client:
                await platform.wait_started()
                yield ControlPlane(client, store, settings.database_url)
        finally:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await nc.jetstream().delete_stream(settings.events_stream)

    return start


def new_email() -> str:
    return f"abuse-{uuid.uuid4().hex[:12]}@example.com"


def email_subject(email: str, secret: str) -> str:
    return master_key(secret).email_subject(email)


async def sign_up(
    client: httpx.AsyncClient, email: str | None = None, headers: Any = None
) -> httpx.Response:
    body = {"email": email or new_email(), "password": PASSWORD, "company_name": "Abuse Air"}
    return await client.post("/api/customers/signup", json=body, headers=headers)


async def log_in(
    client: httpx.AsyncClient, email: str, password: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    body = {"email": email, "password": password}
    return await client.post("/api/customers/login", json=body, headers=headers)


def assert_rate_limited(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert 0 < int(response.headers["Retry-After"]) <= 3600
    error = response.json()["error"]
    assert (error["status"], error["code"]) == (429, "rate_limited")
    assert error["message"]


# --- signups ----------------------------------------------------------------------------------


async def test_fifteen_concurrent_signups_from_one_address_start_only_ten(plane, nc) -> None:
    # The attack, on the production defaults: 15 at once from one address.
    async with plane() as cp:
        emails = [new_email() for _ in range(15)]
        answers = await asyncio.gather(*(sign_up(cp.client, e) for e in emails))
        codes = sorted(a.status_code for a in answers)
        assert codes == [201] * 10 + [429] * 5, codes
        for answer in answers:
            if answer.status_code == 429:
                assert_rate_limited(answer)
        # Exactly the accepted ones are on the log; a refused signup appended nothing.
        accepted = {e for e, a in zip(emails, answers, strict=True) if a.status_code == 201}
        subjects = await cp.signed_up_subjects()
        assert sorted(subjects) == sorted(
            cp.store.subject(
                "CustomerSignedUp", email_subject(e, cp.store.settings.data_keys_master_key)
            )
            for e in accepted
        )
        assert set(subjects.values()) == {1}
        # Refused ones were not counted either: the address stands at its limit, not beyond.
        assert (await cp.counted("signup_windows", "signups"))["addr:127.0.0.1"] == 10


async def test_a_signup_that_waited_for_another_is_told_no_more_than_the_window(plane) -> None:
    # CI found Retry-After 3601 on a one-hour window: a signup whose transaction began before a
    # concurrent one opened the window, then waited for its row lock, measured from its own
    # (earlier) start. Here the concurrent signup is a transaction that holds the address's row
    # while ours waits, and then opens a full window, as a signup that began later would.
    async with plane(signup_max_per_address=1) as cp:
        assert (await sign_up(cp.client)).status_code == 201
        holder = await asyncpg.connect(cp.database_url)
        try:
            async with holder.transaction():
                await holder.execute(
                    "SELECT 1 FROM signup.signup_windows WHERE subject = 'addr:127.0.0.1' "
                    "FOR UPDATE"
                )
                waiting = asyncio.create_task(sign_up(cp.client))
                await eventually(
                    lambda: holder.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted"),
                    what="the signup to wait for the address's row",
                )
                await holder.execute(
                    "UPDATE signup.signup_windows SET window_ends_at = clock_timestamp() "
                    "+ interval '3600 seconds' WHERE subject = 'addr:127.0.0.1'"
                )
            assert_rate_limited(await waiting)
        finally:
            await holder.close()


async def test_the_overall_cap_holds_across_many_addresses(plane) -> None:
    async with plane(signup_max_per_hour=4, trusted_proxy_hops=1) as cp:
        codes = []
        for i in range(4):
            answer = await sign_up(cp.client, headers={"X-Forwarded-For": f"198.51.100.{i + 1}"})
            codes.append(answer.status_code)
        assert codes == [201] * 4
        refused = await sign_up(cp.client, headers={"X-Forwarded-For": "198.51.100.99"})
        assert_rate_limited(refused)
        assert "platform" in refused.json()["error"]["message"]
        assert len(await cp.signed_up_subjects()) == 4


async def test_a_retried_signup_gets_its_first_answer_not_a_429(plane) -> None:
    async with plane(signup_max_per_address=2) as cp:
        first = await sign_up(cp.client, "first@example.com", {"Idempotency-Key": "k-first"})
        assert first.status_code == 201
        assert (await sign_up(cp.client)).status_code == 201
        late = await sign_up(cp.client, "late@example.com", {"Idempotency-Key": "k-late"})
        assert_rate_limited(late)
        # The retry of the answered signup gets that answer, though the address is spent.
        again = await sign_up(cp.client, "first@example.com", {"Idempotency-Key": "k-first"})
        assert again.status_code == 201 and again.json() == first.json()
        # A 429 is not kept as the key's answer: once the window is over, the retry runs.
        assert_rate_limited(
            await sign_up(cp.client, "late@example.com", {"Idempotency-Key": "k-late"})
        )
        conn = await asyncpg.connect(cp.database_url)
        try:
            await conn.execute("UPDATE signup.signup_windows SET window_ends_at = now()")
        finally:
            await conn.close()
        retried = await sign_up(cp.client, "late@example.com", {"Idempotency-Key": "k-late"})
        assert retried.status_code == 201, retried.text
        assert len(await cp.signed_up_subjects()) == 3


# --- logins -------------------------------------------------------------------------------------


async def test_sixty_concurrent_wrong_passwords_reach_the_hash_five_times(plane) -> None:
    async with plane() as cp:
        email = new_email()
        assert (await sign_up(cp.client, email)).status_code == 201
        answers = await asyncio.gather(
            *(log_in(cp.client, email, f"wrong guess {i}") for i in range(60))
        )
        codes = sorted(a.status_code for a in answers)
        assert codes == [401] * 5 + [429] * 55, codes
        for answer in answers:
            if answer.status_code == 429:
                assert_rate_limited(answer)
        assert_rate_limited(await log_in(cp.client, email, PASSWORD))


# --- which client address is believed -----------------------------------------------------------


async def test_a_spoofed_forwarded_for_resets_no_limit_without_trusted_proxies(plane) -> None:
    # TRUSTED_PROXY_HOPS=0 (the default): neither uvicorn nor the app reads the header.
    async with plane(signup_max_per_address=3) as cp:
        spoofed = [{"X-Forwarded-For": f"203.0.113.{i}"} for i in range(1, 23)]
        logins = [
            (await log_in(cp.client, new_email(), "wrong guess", h)).status_code for h in spoofed
        ]
        assert logins[:20] == [401] * 20
        assert logins[20:] == [429, 429]
        counted = await cp.counted("login_failures", "failures")
        assert not any(s.startswith("addr:203.0.113.") for s in counted), counted
        signups = [(await sign_up(cp.client, headers=h)).status_code for h in spoofed[:4]]
        assert signups == [201, 201, 201, 429]


async def test_forwarded_for_is_believed_for_exactly_the_configured_hops(plane) -> None:
    async with plane(signup_max_per_address=2, trusted_proxy_hops=1) as cp:
        # What a client writes sits left of what our one proxy appends: only the last counts.
        for forged in ("6.6.6.1", "6.6.6.2"):
            answer = await sign_up(cp.client, headers={"X-Forwarded-For": f"{forged}, 192.0.2.7"})
            assert answer.status_code == 201
        assert_rate_limited(
            await sign_up(cp.client, headers={"X-Forwarded-For": "6.6.6.3, 192.0.2.7"})
        )
        # Two header lines are one list; the proxy's entry is still the last.
        assert_rate_limited(
            await sign_up(
                cp.client,
                headers=[("X-Forwarded-For", "192.0.2.8"), ("X-Forwarded-For", "192.0.2.7")],
            )
        )
        assert (
            await sign_up(cp.client, headers={"X-Forwarded-For": "192.0.2.8"})
        ).status_code == 201
        # An IPv6 subscriber's /64 is one address: rotating within it resets nothing.
        for host in ("2001:db8:1:2::1", "2001:db8:1:2::2"):
            assert (await sign_up(cp.client, headers={"X-Forwarded-For": host})).status_code == 201
        assert_rate_limited(
            await sign_up(cp.client, headers={"X-Forwarded-For": "2001:db8:1:2::3"})
        )
        # Garbage where the proxy's entry should be is not believed: the peer counts.
        assert (
            await sign_up(cp.client, headers={"X-Forwarded-For": "not-an-ip"})
        ).status_code == 201
        counted = await cp.counted("signup_windows", "signups")
        assert counted == {
            "addr:192.0.2.7": 2,
            "addr:192.0.2.8": 1,
            "addr:2001:db8:1:2::/64": 2,
            "addr:127.0.0.1": 1,
            "all": 6,
        }
    async with plane(signup_max_per_address=1, trusted_proxy_hops=2) as cp:
        two = {"X-Forwarded-For": "6.6.6.6, 192.0.2.20, 10.0.0.5"}
        assert (await sign_up(cp.client, headers=two)).status_code == 201
        assert_rate_limited(await sign_up(cp.client, headers=two))
        # Fewer entries than hops: the request did not come through our proxies; the peer counts.
        assert (
            await sign_up(cp.client, headers={"X-Forwarded-For": "192.0.2.20"})
        ).status_code == 201
        counted = await cp.counted("signup_windows", "signups")
        assert {s for s in counted if s != "all"} == {"addr:192.0.2.20", "addr:127.0.0.1"}


# --- the dashboard's address assertion ---------------------------------------------------------


def relay_header(
    customer_id: str,
    address: str,
    email: str,
    *,
    secret: str = RELAY_SECRET,
    issued: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """What an instance sends, built from the README's description alone: a key derived from
    LOGIN_RELAY_SECRET for the customer, an HMAC over the address, time, nonce and email."""
    key = hmac.new(secret.encode(), f"login-relay:{customer_id}".encode(), "sha256").hexdigest()
    issued = int(time.time()) if issued is None else issued
    nonce = nonce or secrets.token_hex(16)
    message = "\n".join(("login-relay/v1", customer_id, address, str(issued), nonce, email))
    signature = hmac.new(key.encode(), message.encode(), "sha256").hexdigest()
    return {
        "Iotistic-Relayed-Client": (
            f"instance={customer_id}; address={address}; ts={issued}; nonce={nonce}; "
            f"sig={signature}"
        )
    }


async def test_a_forged_or_replayed_address_assertion_is_ignored(plane) -> None:
    async with plane(login_relay_secret=RELAY_SECRET) as cp:
        instance = str(uuid.uuid4())
        # Twenty guesses, each claiming a fresh address with a forged signature: all count
        # against the caller's own address, which is then spent.
        for i in range(20):
            email = new_email()
            forged = relay_header(instance, f"198.51.100.{i}", email, secret="x" * 40)
            assert (await log_in(cp.client, email, "wrong", forged)).status_code == 401
        email = new_email()
        assert_rate_limited(
            await log_in(
                cp.client, email, "wrong", relay_header(instance, "1.2.3.4", email, secret="y" * 40)
            )
        )
        # A correctly signed assertion is believed: its browser has its own count.
        email = new_email()
        genuine = relay_header(instance, "192.0.2.50", email)
        assert (await log_in(cp.client, email, "wrong", genuine)).status_code == 401
        # The same assertion again is a replay: ignored, so the spent address answers.
        assert_rate_limited(await log_in(cp.client, email, "wrong", genuine))
        # Stale, for another email, or malformed: ignored, never an error.
        other = new_email()
        ignored = [
            relay_header(instance, "192.0.2.51", other, issued=int(time.time()) - 600),
            relay_header(instance, "192.0.2.52", "someone-else@example.com"),
            relay_header(str(uuid.uuid4()), "192.0.2.53", other, secret="z" * 40),
            relay_header(instance, "not-an-address", other),
            {"Iotistic-Relayed-Client": "instance=; ;;=;sig=" + "0" * 64},
            {"Iotistic-Relayed-Client": "x" * 4000},
        ]
        for header in ignored:
            assert_rate_limited(await log_in(cp.client, other, "wrong", header))
        counted = await cp.counted("login_failures", "failures")
        addresses = {s for s in counted if s.startswith("addr:")}
        assert addresses == {"addr:127.0.0.1", "addr:192.0.2.50"}, addresses


# --- two tenants' dashboards, on real instances --------------------------------------------------


@pytest.fixture(scope="module")
async def local_plane(
    settings: ServiceSettings,
    store: EventStore,
    broker: EmbeddedMosquitto,
    port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[httpx.AsyncClient]:
    platform = Platform.from_settings(
        settings,
        list(CONTROL_PLANE.values()),
        **local_backend_settings(broker, port, tmp_path_factory.mktemp("instances")),
    )
    async with serving(build_app(platform, "all"), port) as http:
        await platform.wait_started()
        yield http


async def instance_of(client: httpx.AsyncClient, email: str) -> str:
    signed = await client.post(
        "/api/customers/signup",
        json={"email": email, "password": PASSWORD, "company_name": "Tenant Air"},
    )
    assert signed.status_code == 201, signed.text
    token = (await log_in(client, email, PASSWORD)).json()["token"]
    me = await eventually(
        lambda: client.get("/api/customers/me", headers={"Authorization": f"Bearer {token}"}),
        lambda r: r.json()["deployment"]["status"] == "ready",
        timeout=60,
        what="the customer's instance",
    )
    return str(me.json()["deployment"]["instance_url"])


def browser(url: str, address: str) -> httpx.AsyncClient:
    """A browser at ``address`` (loopback holds all of 127/8, so each gets its own)."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(base_url=url, transport=transport, timeout=20)


@pytest.mark.slow
async def test_one_tenants_bad_tries_do_not_lock_another_tenants_dashboard(local_plane) -> None:
    alice_url = await instance_of(local_plane, "alice-dash@example.com")
    bob_url = await instance_of(local_plane, "bob-dash@example.com")
    async with (
        browser(alice_url, "127.0.0.2") as attacker,
        browser(bob_url, "127.0.0.3") as bob,
        browser(alice_url, "127.0.0.4") as alice,
    ):
        # Every local instance reaches the control plane from 127.0.0.1: before the fix,
        # twenty bad tries at any dashboard locked them all.
        tries: list[Any] = []
        for _ in range(21):
            body = {"email": new_email(), "password": "wrong guess"}
            tries.append(await attacker.post("/dashboard/login", json=body))
        # Another tenant's dashboard, and the same tenant from another browser, sign in.
        signed_in = await bob.post(
            "/dashboard/login", json={"email": "bob-dash@example.com", "password": PASSWORD}
        )
        assert signed_in.status_code == 200, signed_in.text
        assert "iotistic_session" in signed_in.cookies
        own = {"email": "alice-dash@example.com", "password": PASSWORD}
        assert (await alice.post("/dashboard/login", json=own)).status_code == 200
        # The attacker's own browser is what got spent, and the dashboard says so with a 429,
        # even for the right password or with a spoofed header.
        assert [t.status_code for t in tries[:20]] == [401] * 20
        assert_rate_limited(tries[20])
        assert_rate_limited(await attacker.post("/dashboard/login", json=own))
        assert_rate_limited(
            await attacker.post(
                "/dashboard/login", json=own, headers={"X-Forwarded-For": "127.0.0.9"}
            )
        )
        missing = await alice.post("/dashboard/login", json={"email": "a@example.com"})
        assert missing.status_code == 400
        assert missing.json()["error"]["fields"] == [
            {"field": "password", "reason": "is required (a string)"}
        ]
