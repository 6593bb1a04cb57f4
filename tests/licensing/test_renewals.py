"""A paid subscription's license is renewed before it lapses; others are left to end."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest

from contracts import (
    CustomerSignedUp,
    LicenseIssued,
    PaymentFailed,
    SubscriptionActivated,
    SubscriptionCanceled,
    decode_envelope,
    decode_event,
)
from libs.config import ServiceSettings
from libs.db.postgres import create_pool
from libs.eventlog.store import EventStore
from libs.runtime.platform import Platform
from services.licensing.app import LICENSING
from services.licensing.issuing import LicenseSigner
from services.licensing.keys import load_keyring
from services.licensing.renewals import renew_due_licenses
from services.targets import build_app
from support import eventually, license_keys_dir, serving

BEFORE = timedelta(days=7)


@pytest.fixture(scope="module")
async def platform(settings: ServiceSettings, store: EventStore) -> AsyncIterator[Platform]:
    platform = Platform.from_settings(settings, [LICENSING], license_keys_dir=license_keys_dir())
    async with serving(build_app(platform, "all")):
        await platform.wait_started()
        yield platform


@pytest.fixture(scope="module")
def signer() -> LicenseSigner:
    from pathlib import Path

    return LicenseSigner(load_keyring(Path(license_keys_dir())))


async def licenses(platform: Platform, customer_id: str) -> list[Any]:
    async with platform.runtime_of("licensing").db().acquire() as conn:
        return await conn.fetch(
            "SELECT * FROM licenses WHERE customer_id = $1 ORDER BY issued_at", customer_id
        )


async def subscribed(store: EventStore, platform: Platform, *, then: str | None = None) -> str:
    """A customer on an active professional subscription, optionally then past due/canceled."""
    customer_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    await store.publish(
        CustomerSignedUp(
            customer_id=customer_id,
            email=f"{customer_id}@example.com",
            email_display=f"{customer_id}@example.com",
            company_name="Renewing Air",
            signed_up_at=now,
        ),
        customer_id=customer_id,
    )
    events: list[Any] = []
    if then != "trialing":
        events.append(
            SubscriptionActivated(
                customer_id=customer_id,
                plan="professional",
                status="active",
                stripe_customer_id=f"cus_{customer_id[:8]}",
                stripe_subscription_id=f"sub_{customer_id[:8]}",
                current_period_end=now + timedelta(days=30),
            )
        )
    if then == "past_due":
        events.append(
            PaymentFailed(
                customer_id=customer_id,
                stripe_invoice_id="in_1",
                amount_due=9900,
                currency="eur",
                attempt_count=1,
            )
        )
    if then == "canceled":
        events.append(
            SubscriptionCanceled(
                customer_id=customer_id,
                stripe_subscription_id=f"sub_{customer_id[:8]}",
                canceled_at=now,
            )
        )
    for event in events:
        await store.publish(event, customer_id=customer_id)
    await eventually(
        lambda: licenses(platform, customer_id),
        lambda rows: len(rows) == 1 + len(events),
        what="the licenses of the events",
    )
    return customer_id


async def renewals_on_the_log(store: EventStore, customer_id: str) -> list[LicenseIssued]:
    found = []
    async for message in store.read(event_types=["LicenseIssued"]):
        envelope = decode_envelope(message.data)
        event = decode_event(envelope)
        if envelope.customer_id == customer_id and event.license_type == "renewal":
            found.append(event)
    return found


async def test_an_active_subscription_is_renewed_once_before_it_lapses(
    platform, store, signer
) -> None:
    customer_id = await subscribed(store, platform)
    pool = platform.runtime_of("licensing").db()
    current = (await licenses(platform, customer_id))[-1]
    assert current["license_type"] == "subscription"

    # Not yet due: more than seven days left.
    early = current["expires_at"] - BEFORE - timedelta(hours=1)
    assert await renew_due_licenses(pool, store, signer, early, BEFORE) == 0

    due = current["expires_at"] - BEFORE + timedelta(hours=1)
    # Two passes at once (a restart, a second replica): one renewal on the log.
    await asyncio.gather(
        renew_due_licenses(pool, store, signer, due, BEFORE),
        renew_due_licenses(pool, store, signer, due, BEFORE),
    )
    rows = await eventually(
        lambda: licenses(platform, customer_id),
        lambda rows: rows[-1]["license_type"] == "renewal",
        what="the renewal in the licenses",
    )
    renewal = rows[-1]
    assert renewal["plan"] == "professional"
    assert renewal["expires_at"] == current["expires_at"] + timedelta(days=30)
    assert renewal["issued_at"] < current["expires_at"]  # no gap
    claims = jwt.decode(
        renewal["jwt"],
        signer.keyring.current.public_key,
        algorithms=["RS256"],
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert claims["plan"] == "professional"
    assert claims["exp"] == int(renewal["expires_at"].timestamp())

    # The renewed license is not due again until its own window.
    assert await renew_due_licenses(pool, store, signer, due, BEFORE) == 0
    assert len(await renewals_on_the_log(store, customer_id)) == 1
    history = [r["license_type"] for r in await licenses(platform, customer_id)]
    assert history == ["trial_signup", "subscription", "renewal"]


@pytest.mark.parametrize("then", ["past_due", "canceled", "trialing"])
async def test_unpaid_subscriptions_are_not_renewed(platform, store, signer, then) -> None:
    customer_id = await subscribed(store, platform, then=then)
    pool = platform.runtime_of("licensing").db()
    far = datetime.now(UTC) + timedelta(days=60)
    await renew_due_licenses(pool, store, signer, far, BEFORE)
    assert await renewals_on_the_log(store, customer_id) == []


async def test_a_renewal_is_not_issued_over_a_cancellation_the_read_model_has_not_seen(
    fresh_log: Any, signer: LicenseSigner
) -> None:
    # Issue 12: the renewal scheduler decided on read models that may lag the log; a
    # cancellation on the log but not yet applied got the customer another 30 days.
    settings, store = await fresh_log()
    own = Platform.from_settings(settings, [LICENSING], license_keys_dir=license_keys_dir())
    await own.start()
    await own.wait_started()
    pool = await create_pool(settings.database_url, "licensing")
    try:
        customer_id = await subscribed(store, own)
        current = (await licenses(own, customer_id))[-1]
        due = current["expires_at"] - BEFORE + timedelta(hours=1)
        await own.stop()  # nothing applies what comes next
        await store.publish(
            SubscriptionCanceled(
                customer_id=customer_id,
                stripe_subscription_id=f"sub_{customer_id[:8]}",
                canceled_at=datetime.now(UTC),
            ),
            customer_id=customer_id,
        )
        assert await renew_due_licenses(pool, store, signer, due, BEFORE) == 0
        assert await renewals_on_the_log(store, customer_id) == []
    finally:
        await pool.close()
