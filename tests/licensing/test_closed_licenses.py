"""Licensing honours what signup decided about an account: a session from before a password
reset or of a closed account is refused, a closed account's license is revoked once however
often the closure arrives, and no license is issued or renewed for it afterwards. Signup,
licensing and billing on real Postgres and JetStream; the reset and the closure go through
signup's own API, as a customer does them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from account_flows import (
    PUBLIC_URL,
    SESSION_REFUSED,
    bearer,
    close_account,
    log_in,
    new_email,
    reset_password,
    sign_up,
)

from contracts import CustomerClosed, SubscriptionActivated, SubscriptionChanged, decode_envelope
from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.projections.apply import Recorded
from libs.projections.runner import durable_name
from libs.runtime.platform import Platform
from services.billing.app import BILLING
from services.licensing.app import LICENSING
from services.licensing.closing import when_customer_closed_revoke_license
from services.licensing.issuing import LicenseSigner
from services.licensing.keys import load_keyring
from services.licensing.renewals import renew_due_licenses
from services.signup.app import SIGNUP
from services.targets import build_app
from support import SUITE_SIGNUP_LIMITS, eventually, license_keys_dir, serving

ADMIN = "admin-token-for-closed-licenses-0123456789"


@pytest.fixture(scope="module")
async def platform(settings: ServiceSettings, store: EventStore) -> Platform:
    return Platform.from_settings(
        settings,
        [SIGNUP, LICENSING, BILLING],
        license_keys_dir=license_keys_dir(),
        argon2_memory_kib=8192,
        argon2_time_cost=1,
        public_url=PUBLIC_URL,
        admin_token=ADMIN,
        **SUITE_SIGNUP_LIMITS,
    )


@pytest.fixture(scope="module")
async def client(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(build_app(platform, "all")) as http:
        await platform.wait_started()
        yield http


async def license_of(client: httpx.AsyncClient, customer_id: str, token: str) -> httpx.Response:
    return await client.get(f"/api/licenses/{customer_id}", headers=bearer(token))


async def events_of(store: EventStore, event_type: str, customer_id: str) -> list[Any]:
    found = []
    async for stored in store.read(event_types=[event_type]):
        envelope = decode_envelope(stored.data)
        if envelope.customer_id == customer_id:
            found.append(envelope)
    return found


async def settled(platform: Platform, store: EventStore) -> None:
    """The license reactor has applied all it has, and its outbox has reached the log."""
    durable = durable_name("licensing", "issue_licenses")
    pool = platform.runtime_of("licensing").db()
    await eventually(lambda: store.consumer_pending(durable), lambda n: n == 0, what="reactor")
    await eventually(lambda: pool.fetchval("SELECT count(*) FROM outbox"), lambda n: n == 0)


async def test_a_session_from_before_a_password_reset_is_refused_and_a_new_one_works(
    client, platform
) -> None:
    email = new_email("licensing-reset")
    customer_id = await sign_up(client, email)
    old = await log_in(client, email)
    await eventually(lambda: license_of(client, customer_id, old), lambda r: r.is_success)

    new = await reset_password(client, platform, email)
    await eventually(lambda: license_of(client, customer_id, old), lambda r: r.status_code == 401)
    history = await client.get(f"/api/licenses/{customer_id}/history", headers=bearer(old))
    assert history.status_code == 401
    assert history.json()["error"]["message"] == SESSION_REFUSED
    assert (await license_of(client, customer_id, new)).status_code == 200
    again = await client.get(f"/api/licenses/{customer_id}/history", headers=bearer(new))
    assert again.status_code == 200


async def test_closing_revokes_the_current_license_once_and_refuses_the_old_session(
    client, platform, store
) -> None:
    email = new_email("licensing-closed")
    customer_id = await sign_up(client, email)
    session = await log_in(client, email)
    current = (
        await eventually(lambda: license_of(client, customer_id, session), lambda r: r.is_success)
    ).json()
    await close_account(client, session)

    revoked = await eventually(
        lambda: events_of(store, "LicenseRevoked", customer_id), what="LicenseRevoked"
    )
    body = msgspec.json.decode(revoked[0].data)
    assert body["license_id"] == current["license_id"]
    assert body["reason"] == "account closed"
    await eventually(
        lambda: license_of(client, customer_id, session), lambda r: r.status_code == 401
    )
    # The admin sees the license as revoked, not an older one in its place; verifying its
    # token (signature and times still good) says it is revoked.
    admin = {"Authorization": f"Bearer {ADMIN}"}
    shown = await eventually(
        lambda: client.get(f"/api/licenses/{customer_id}", headers=admin),
        lambda r: r.json().get("status") == "revoked",
    )
    assert shown.json()["license_id"] == current["license_id"]
    verified = await client.post("/api/licenses/verify", json={"token": current["jwt"]})
    assert verified.json() == {
        "valid": False,
        "reason": "revoked",
        "message": "the license was revoked",
    }

    # The closure arrives again: an admin closes it too (a new event), and the first one is
    # applied once more (a redelivery past the checkpoint, as after a crash).
    await store.publish(
        CustomerClosed(customer_id=customer_id, closed_by="admin"), customer_id=customer_id
    )
    first = (await events_of(store, "CustomerClosed", customer_id))[0]
    pool = platform.runtime_of("licensing").db()
    async with pool.acquire() as conn, conn.transaction():
        await when_customer_closed_revoke_license(
            conn, Recorded(seq=0, envelope=first, event=decode_closed(first))
        )
        assert await conn.fetchval("SELECT count(*) FROM outbox") == 0
    await settled(platform, store)
    assert len(await events_of(store, "LicenseRevoked", customer_id)) == 1


def decode_closed(envelope: Any) -> CustomerClosed:
    return msgspec.json.decode(envelope.data, type=CustomerClosed)


def active(customer_id: str, event: type[SubscriptionActivated | SubscriptionChanged]) -> Any:
    extra = {"stripe_customer_id": "cus_closing"} if event is SubscriptionActivated else {}
    return event(
        customer_id=customer_id,
        plan="professional",
        status="active",
        stripe_subscription_id="sub_closing",
        **extra,
    )


async def test_no_license_is_issued_or_renewed_after_closing(client, platform, store) -> None:
    customer_id = await sign_up(client, new_email("licensing-after"))
    # Two subscription licenses: closing revokes the newer; the older must not be renewed.
    await store.publish(active(customer_id, SubscriptionActivated), customer_id=customer_id)
    await store.publish(active(customer_id, SubscriptionChanged), customer_id=customer_id)
    await eventually(
        lambda: events_of(store, "LicenseIssued", customer_id),
        lambda found: len(found) == 3,
        what="trial and two subscription licenses",
    )
    await settled(platform, store)
    # Closed by an admin (signup's own API refuses while a subscription is active).
    await store.publish(
        CustomerClosed(customer_id=customer_id, closed_by="admin"), customer_id=customer_id
    )
    revoked = await eventually(lambda: events_of(store, "LicenseRevoked", customer_id))
    newest = (await events_of(store, "LicenseIssued", customer_id))[-1]
    assert (
        msgspec.json.decode(revoked[0].data)["license_id"]
        == msgspec.json.decode(newest.data)["license_id"]
    )

    # The subscription changes again at Stripe as the account closes (a race billing loses).
    await store.publish(active(customer_id, SubscriptionChanged), customer_id=customer_id)
    await settled(platform, store)
    assert len(await events_of(store, "LicenseIssued", customer_id)) == 3
    # Renewal, run far past every license's end, renews nothing of the closed account.
    pool = platform.runtime_of("licensing").db()
    await eventually(
        lambda: pool.fetchval(
            "SELECT count(*) FROM licenses WHERE customer_id = $1 AND revoked_at IS NOT NULL",
            customer_id,
        ),
        lambda n: n == 1,
    )
    later = datetime.now(UTC) + timedelta(days=400)
    assert await renew_due_licenses(pool, store, signer(), later, timedelta(days=7)) == 0
    assert len(await events_of(store, "LicenseIssued", customer_id)) == 3
    assert len(await events_of(store, "LicenseRevoked", customer_id)) == 1


def signer() -> LicenseSigner:
    return LicenseSigner(load_keyring(Path(license_keys_dir())))
