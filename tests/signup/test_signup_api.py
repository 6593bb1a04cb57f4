"""The public signup API with licensing and billing answering, on real Postgres and JetStream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet

from contracts import (
    CustomerClosed,
    DeploymentFailed,
    DeploymentRequested,
    DeploymentStarted,
    DeploymentSucceeded,
    Event,
    InstanceCapacityChanged,
    InstanceDegraded,
    InstanceRecovered,
)
from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.runtime.platform import Platform
from libs.sealing.vault import master_key
from services.billing.app import BILLING
from services.licensing.app import LICENSING
from services.signup.app import SIGNUP
from services.signup.private_state import forget_stale_private_state
from services.targets import build_app
from support import SUITE_SIGNUP_LIMITS, assert_replays_clean, eventually, license_keys_dir, serving

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
async def platform(settings: ServiceSettings, store: EventStore) -> Platform:
    """Signup, licensing and billing in one process, as in the embedded default."""
    platform = Platform.from_settings(
        settings,
        [SIGNUP, LICENSING, BILLING],
        license_keys_dir=license_keys_dir(),
        # Cheaper hashing keeps the suite fast; the real cost is measured by `just bench`.
        argon2_memory_kib=8192,
        argon2_time_cost=1,
        **SUITE_SIGNUP_LIMITS,
    )
    return platform


@pytest.fixture(scope="module")
async def client(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(build_app(platform, "all")) as http:
        await platform.wait_started()
        yield http


_counter = iter(range(10**6))


def new_email() -> str:
    return f"Customer.{next(_counter)}.{datetime.now(UTC).timestamp():.0f}@Example.com"


async def sign_up(client: httpx.AsyncClient, email: str | None = None, **body: Any) -> Any:
    payload = {"email": email or new_email(), "password": PASSWORD, "company_name": "Acme Air"}
    payload.update(body)
    return await client.post("/api/customers/signup", json=payload)


async def test_signup_answers_with_account_trial_and_a_license_that_verifies(client) -> None:
    email = new_email()
    response = await sign_up(client, email, full_name="Grace Hopper")
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"message", "customer", "subscription", "license", "deployment"}
    assert body["customer"]["email"] == email.lower()
    assert body["customer"]["company_name"] == "Acme Air"
    subscription = body["subscription"]
    assert subscription["plan"] == "starter"
    assert subscription["status"] == "trialing"
    assert subscription["trial_days_remaining"] == 14
    ends = datetime.fromisoformat(subscription["trial_ends_at"])
    assert abs(ends - (datetime.now(UTC) + timedelta(days=14))) < timedelta(minutes=1)
    license_ = body["license"]
    assert license_["status"] == "active"
    assert license_["features"] == {
        "maxDevices": 10,
        "dataRetentionDays": 90,
        "alerting": True,
        "apiAccess": True,
        "webhooks": False,
    }
    assert datetime.fromisoformat(license_["expires_at"]) == ends
    # Not produced yet by anyone: pending, with where to look, never invented.
    assert body["deployment"]["status"] == "pending"
    assert body["deployment"]["job_id"] is None
    assert body["deployment"]["check_status_url"] == "/api/customers/me"

    # The license verifies against the published keys with another JWT library.
    jwks = (await client.get("/.well-known/jwks.json")).json()
    token = jose_jwt.decode(license_["jwt"], KeySet.import_key_set(jwks), algorithms=["RS256"])
    claims = token.claims
    assert token.header["kid"] in {k["kid"] for k in jwks["keys"]}
    assert claims["customerId"] == claims["sub"] == body["customer"]["customer_id"]
    assert claims["plan"] == "starter"
    assert claims["limits"] == {"mqttMessagesPerDay": 100_000, "apiRequestsPerDay": 10_000}
    assert claims["exp"] == int(ends.timestamp())
    assert claims["iss"] == "iotistic-licensing"


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"email": "not-an-email"}, "email", "@"),
        ({"email": "a@b"}, "email", "after the @-sign"),
        ({"email": "   "}, "email", "is required"),
        ({"email": 7}, "email", "must be a string"),
        ({"password": "short1!"}, "password", "at least 8"),
        ({"password": "x" * 129}, "password", "at most 128"),
        ({"password": "password1"}, "password", "too common"),
        ({"password": "aaaaaaaaaaaa"}, "password", "too common"),
        ({"company_name": "   "}, "company_name", "is required"),
        ({"company_name": "c" * 201}, "company_name", "at most 200"),
        ({"full_name": "f" * 201}, "full_name", "at most 200"),
        ({"full_name": "bell\x07"}, "full_name", "control characters"),
        ({"plan": "enterprise"}, "plan", "not a known field"),
    ],
)
async def test_every_invalid_field_gets_a_400_naming_it(client, body, field, reason) -> None:
    response = await sign_up(client, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    named = {f["field"]: f["reason"] for f in error["fields"]}
    assert field in named, error
    assert reason in named[field]


async def test_all_bad_fields_are_named_at_once(client) -> None:
    response = await client.post(
        "/api/customers/signup", json={"email": "nope", "password": "x", "extra": 1}
    )
    assert response.status_code == 400
    fields = {f["field"] for f in response.json()["error"]["fields"]}
    assert fields == {"email", "password", "company_name", "extra"}
    assert (await client.post("/api/customers/signup", json=[1, 2])).status_code == 400
    garbage = await client.post(
        "/api/customers/signup", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert garbage.status_code == 400
    assert "Traceback" not in garbage.text


async def test_fifty_concurrent_signups_with_one_email_make_one_account(
    client, store: EventStore
) -> None:
    email = new_email()
    responses = await asyncio.gather(*(sign_up(client, email) for _ in range(50)))
    codes = sorted(r.status_code for r in responses)
    # One wins the email. The same email and password sent again is the same signup retried:
    # those that find the account answer with it (until the login limit says enough); those
    # that find it still being made are told to come back (503, Retry-After).
    assert codes.count(201) >= 1, codes
    assert set(codes) <= {201, 409, 429, 503}, codes
    assert all(r.headers.get("Retry-After") for r in responses if r.status_code == 503)
    winners = {r.json()["customer"]["customer_id"] for r in responses if r.status_code == 201}
    assert len(winners) == 1, winners
    subject = store.subject(
        "CustomerSignedUp",
        master_key(store.settings.data_keys_master_key).email_subject(email.lower()),
    )
    assert await store.count_by_subject(subject) == {subject: 1}


async def test_an_idempotency_key_makes_a_retry_return_the_first_answer(
    client, store: EventStore
) -> None:
    email = new_email()
    headers = {"Idempotency-Key": f"retry-{email}"}
    body = {"email": email, "password": PASSWORD, "company_name": "Acme Air"}
    first = await client.post("/api/customers/signup", json=body, headers=headers)
    again = await client.post("/api/customers/signup", json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    subject = store.subject(
        "CustomerSignedUp",
        master_key(store.settings.data_keys_master_key).email_subject(email.lower()),
    )
    assert await store.count_by_subject(subject) == {subject: 1}
    other = await client.post(
        "/api/customers/signup", json={**body, "company_name": "Other"}, headers=headers
    )
    assert other.status_code == 422


async def log_in(client: httpx.AsyncClient, email: str, password: str) -> Any:
    return await client.post("/api/customers/login", json={"email": email, "password": password})


async def test_login_gives_a_session_for_the_account_view(client) -> None:
    email = new_email()
    signed = (await sign_up(client, email)).json()
    response = await log_in(client, email.upper(), PASSWORD)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["customer_id"] == signed["customer"]["customer_id"]
    assert body["email"] == email.lower()
    assert body["license"]["jwt"] == signed["license"]["jwt"]
    me = await client.get("/api/customers/me", headers={"Authorization": f"Bearer {body['token']}"})
    assert me.status_code == 200
    view = me.json()
    assert view["customer"]["customer_id"] == body["customer_id"]
    assert view["subscription"]["status"] == "trialing"
    assert view["license"]["status"] == "active"
    assert view["deployment"]["check_status_url"] == "/api/customers/me"
    assert (await client.get("/api/customers/me")).status_code == 401
    tampered = body["token"][:-3] + ("AAA" if not body["token"].endswith("AAA") else "BBB")
    bad = await client.get("/api/customers/me", headers={"Authorization": f"Bearer {tampered}"})
    assert bad.status_code == 401


async def test_login_does_not_tell_unknown_emails_from_wrong_passwords(client) -> None:
    email = new_email()
    await sign_up(client, email)
    wrong = await log_in(client, email, "not the password at all")
    unknown = await log_in(client, new_email(), "not the password at all")
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    assert (await client.post("/api/customers/login", json={"email": email})).status_code == 400


async def test_repeated_failures_are_rate_limited_per_email(client) -> None:
    email = new_email()
    await sign_up(client, email)
    codes = [(await log_in(client, email, f"wrong guess {i}")).status_code for i in range(5)]
    assert codes == [401] * 5
    limited = await log_in(client, email, PASSWORD)  # even the right password waits now
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) > 0
    assert limited.json()["error"]["code"] == "rate_limited"


async def test_repeated_failures_are_rate_limited_per_client_address(client, platform) -> None:
    # The test client always comes from the same address; spread guesses over many emails.
    conn = await asyncpg.connect(platform.settings.database_url)
    try:
        await conn.execute("DELETE FROM signup.login_failures WHERE subject LIKE 'addr:%'")
        codes = [(await log_in(client, new_email(), "wrong guess")).status_code for _ in range(21)]
        assert codes[:20] == [401] * 20
        assert codes[20] == 429
    finally:
        await conn.execute("DELETE FROM signup.login_failures WHERE subject LIKE 'addr:%'")
        await conn.close()


async def test_licenses_are_shown_to_their_customer_and_admins_only(client, platform) -> None:
    email, other = new_email(), new_email()
    mine = (await sign_up(client, email)).json()
    await sign_up(client, other)
    token = (await log_in(client, email, PASSWORD)).json()["token"]
    other_token = (await log_in(client, other, PASSWORD)).json()["token"]
    customer_id = mine["customer"]["customer_id"]
    # Licensing's own read model follows the log a few milliseconds behind the signup answer.
    own = await eventually(
        lambda: client.get(
            f"/api/licenses/{customer_id}", headers={"Authorization": f"Bearer {token}"}
        ),
        lambda r: r.status_code != 404,
        what="licensing's read model",
    )
    assert own.status_code == 200
    assert own.json()["jwt"] == mine["license"]["jwt"]
    assert own.json()["status"] == "active"
    foreign = await client.get(
        f"/api/licenses/{customer_id}", headers={"Authorization": f"Bearer {other_token}"}
    )
    assert foreign.status_code == 404
    assert (await client.get(f"/api/licenses/{customer_id}")).status_code == 401
    admin = {"Authorization": f"Bearer {platform.settings.admin_token}"}
    history = await client.get(f"/api/licenses/{customer_id}/history", headers=admin)
    assert history.status_code == 200
    [entry] = history.json()["history"]
    assert (entry["action"], entry["license_type"], entry["actor"]) == (
        "issued",
        "trial_signup",
        "system",
    )

    valid = await client.post("/api/licenses/verify", json={"token": mine["license"]["jwt"]})
    assert valid.json()["valid"] is True
    assert valid.json()["claims"]["customerId"] == customer_id
    jwt = mine["license"]["jwt"]
    header, payload, signature = jwt.split(".")
    middle = len(signature) // 2
    flipped = (
        signature[:middle] + ("A" if signature[middle] != "A" else "B") + signature[middle + 1 :]
    )
    tampered = (
        await client.post("/api/licenses/verify", json={"token": f"{header}.{payload}.{flipped}"})
    ).json()
    assert tampered == {"valid": False, "reason": "bad_signature", "message": tampered["message"]}


async def test_no_password_or_hash_ever_reaches_the_log(client, store: EventStore) -> None:
    await sign_up(client, new_email())
    seen = 0
    async for stored in store.read():
        seen += 1
        assert b"argon2" not in stored.data
        assert PASSWORD.encode() not in stored.data
    assert seen > 0


async def test_the_account_follows_its_instance_health_and_the_redeploy_that_repairs_it(
    client, store: EventStore
) -> None:
    email = new_email()
    customer_id = (await sign_up(client, email)).json()["customer"]["customer_id"]
    auth = {"Authorization": f"Bearer {(await log_in(client, email, PASSWORD)).json()['token']}"}
    url = "http://127.0.0.1:1/instance"
    since = datetime(2026, 12, 7, 0, 20, tzinfo=UTC)

    async def then(event: Event, status: str) -> dict[str, Any]:
        await store.publish(event, customer_id=customer_id)
        me = await eventually(
            lambda: client.get("/api/customers/me", headers=auth),
            lambda r: r.json()["deployment"]["status"] == status,
            what=f"the account {status} after {type(event).__name__}",
        )
        deployment: dict[str, Any] = me.json()["deployment"]
        return deployment

    def requested(job: str, by: str) -> DeploymentRequested:
        return DeploymentRequested(
            customer_id=customer_id,
            job_id=job,
            kind="deploy-customer-stack",
            priority=5,
            requested_by=by,
        )

    def started(job: str, attempt: int = 1) -> DeploymentStarted:
        return DeploymentStarted(
            customer_id=customer_id, job_id=job, attempt=attempt, backend="local", worker_id="w"
        )

    def failed(job: str, again: bool) -> DeploymentFailed:
        return DeploymentFailed(
            customer_id=customer_id, job_id=job, attempt=1, error="hung", will_retry=again
        )

    def succeeded(job: str) -> DeploymentSucceeded:
        return DeploymentSucceeded(
            customer_id=customer_id, job_id=job, backend="local", instance_url=url
        )

    degraded = InstanceDegraded(customer_id=customer_id, reason="not answering", since=since)
    await then(requested("j1", "system"), "queued")
    await then(started("j1"), "deploying")
    await then(succeeded("j1"), "ready")
    shown = await then(degraded, "degraded")
    assert (shown["health_reason"], shown["instance_url"]) == ("not answering", url)
    assert shown["degraded_since"].startswith("2026-12-07T00:20:00")
    recovered = InstanceRecovered(
        customer_id=customer_id, degraded_since=since, recovered_at=since + timedelta(seconds=9)
    )
    shown = await then(recovered, "ready")
    assert (shown["health_reason"], shown["degraded_since"]) == (None, None)
    # Degraded again, and the health watch's redeploy: recovering throughout its attempts.
    await then(degraded, "degraded")
    await then(requested("j2", "health-watch"), "recovering")
    await then(started("j2"), "recovering")
    await then(failed("j2", again=True), "recovering")
    await then(started("j2", attempt=2), "recovering")
    shown = await then(succeeded("j2"), "ready")
    assert shown["health_reason"] is None
    # A redeploy that fails for good says so.
    await then(degraded, "degraded")
    await then(requested("j3", "health-watch"), "recovering")
    await then(failed("j3", again=False), "failed")
    # ... and when the instance answers again after all, the account says so.
    await then(recovered, "ready")
    await then(degraded, "degraded")
    # While another job is in hand, a degraded instance does not hide it.
    await then(requested("j4", "admin"), "queued")
    await store.publish(
        InstanceDegraded(customer_id=customer_id, reason="not ready (503): database", since=since),
        customer_id=customer_id,
    )
    me = await eventually(
        lambda: client.get("/api/customers/me", headers=auth),
        lambda r: r.json()["deployment"]["health_reason"] == "not ready (503): database",
        what="the second reason shown",
    )
    assert me.json()["deployment"]["status"] == "queued"
    await then(started("j4"), "deploying")
    await then(failed("j4", again=True), "retrying")
    await then(succeeded("j4"), "ready")


async def test_replays_of_signup_and_licensing_show_no_difference(
    client, platform, store: EventStore
) -> None:
    # A few hundred signups, a few dozen at a time, then both replays must agree.
    results = []
    for _ in range(5):
        results += await asyncio.gather(*(sign_up(client) for _ in range(40)))
    assert {r.status_code for r in results} == {201}
    await assert_replays_clean(platform.settings.database_url, store, [SIGNUP, LICENSING, BILLING])


async def test_a_closed_account_cannot_log_in(client, platform, store: EventStore) -> None:
    email = new_email()
    customer_id = (await sign_up(client, email)).json()["customer"]["customer_id"]
    assert (await log_in(client, email, PASSWORD)).status_code == 200
    await store.publish(
        CustomerClosed(customer_id=customer_id, reason="test", closed_by="admin"),
        customer_id=customer_id,
    )
    response = await eventually(
        lambda: log_in(client, email, PASSWORD),
        lambda r: r.status_code != 200,
        what="the closed account refused",
    )
    # Told plainly (only to someone with the right password; a wrong one is still a 401).
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "account_closed"
    assert (await log_in(client, email, "not the password at all")).status_code == 401


async def test_stale_rate_limit_windows_and_idempotency_answers_are_forgotten(platform) -> None:
    pool = platform.runtime_of("signup").db()
    await pool.execute(
        "INSERT INTO login_failures VALUES ('addr:old', now() - interval '1 hour', 3), "
        "('addr:new', now(), 1)"
    )
    await pool.execute(
        "INSERT INTO idempotency_keys (key, request_hash, created_at) VALUES "
        "('old-key', 'h', now() - interval '2 days'), ('new-key', 'h', now())"
    )
    await pool.execute(
        "INSERT INTO signup_windows VALUES ('addr:ended', now() - interval '1 second', 4), "
        "('addr:open', now() + interval '1 hour', 2)"
    )
    await pool.execute(
        "INSERT INTO login_relay_nonces VALUES ('old-nonce', now() - interval '1 hour'), "
        "('new-nonce', now())"
    )
    await forget_stale_private_state(pool, login_window_seconds=900)
    subjects = {r["subject"] for r in await pool.fetch("SELECT subject FROM login_failures")}
    keys = {r["key"] for r in await pool.fetch("SELECT key FROM idempotency_keys")}
    windows = {r["subject"] for r in await pool.fetch("SELECT subject FROM signup_windows")}
    assert "addr:old" not in subjects and "addr:new" in subjects
    assert "old-key" not in keys and "new-key" in keys
    nonces = {r["nonce"] for r in await pool.fetch("SELECT nonce FROM login_relay_nonces")}
    assert "addr:ended" not in windows and "addr:open" in windows
    assert nonces == {"new-nonce"}
    await pool.execute("DELETE FROM login_failures WHERE subject = 'addr:new'")
    await pool.execute("DELETE FROM signup_windows WHERE subject LIKE 'addr:%'")


async def platform_capacity_says(platform: Platform, store: EventStore, full: bool) -> None:
    """The provisioner's word on capacity, on the log and applied by signup."""
    await store.publish(
        InstanceCapacityChanged(running=5, capacity=5, limited_by="connections", full=full),
        customer_id=None,
        key="platform",
    )
    pool = platform.runtime_of("signup").db()
    await eventually(
        lambda: pool.fetchval('SELECT "full" FROM platform_capacity'),
        lambda applied: applied is full,
        what=f"signup knowing the platform {'full' if full else 'with room'}",
    )


async def test_a_trial_signing_up_while_the_platform_is_full_is_told_it_waits(
    client, platform, store
) -> None:
    await platform_capacity_says(platform, store, full=True)
    try:
        waiting = await sign_up(client)
        assert waiting.status_code == 201, waiting.text
        deployment = waiting.json()["deployment"]
        assert deployment["status"] == "waiting_for_capacity"
        assert "starts by itself as soon as a slot frees" in deployment["detail"]
        assert deployment["estimated_time"] is None
        assert "as soon as the platform has room" in waiting.json()["message"]
    finally:
        await platform_capacity_says(platform, store, full=False)
    room = await sign_up(client)
    assert room.json()["deployment"]["status"] == "pending"
    assert room.json()["deployment"]["detail"] is None
    assert "being deployed" in room.json()["message"]
