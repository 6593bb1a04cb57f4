"""Trials that end unpaid expire, even when billing was down at the moment they ended."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg

from contracts import CustomerSignedUp, SubscriptionActivated, decode_envelope
from libs.config import ServiceSettings
from libs.db.postgres import create_pool
from libs.eventlog.store import EventStore
from libs.runtime.platform import Platform
from services.billing.app import BILLING
from services.billing.trials import expire_ended_trials
from support import eventually


async def expired_events(store: EventStore, customer_id: str) -> int:
    count = 0
    async for message in store.read(event_types=["TrialExpired"]):
        if decode_envelope(message.data).customer_id == customer_id:
            count += 1
    return count


async def test_a_trial_that_ended_while_billing_was_down_expires_after_the_restart(
    settings: ServiceSettings, store: EventStore
) -> None:
    def billing(scan: float) -> Platform:
        return Platform.from_settings(settings, [BILLING], trial_scan_seconds=scan)

    first = billing(3600)  # its one pass runs at start, before this trial exists
    await first.start()
    await first.wait_started()
    customer_id = str(uuid.uuid4())
    # Signed up 20 days ago with a 14-day trial: it ended while nobody was looking.
    signed_up = datetime.now(UTC) - timedelta(days=20)
    await store.publish(
        CustomerSignedUp(
            customer_id=customer_id,
            email=f"{customer_id}@example.com",
            email_display=f"{customer_id}@example.com",
            company_name="Late Air",
            signed_up_at=signed_up,
            trial_days=14,
        ),
        customer_id=customer_id,
    )
    conn = await asyncpg.connect(settings.database_url)
    try:
        # Billing starts the trial, then goes down before its scheduler acts on it.
        await eventually(
            lambda: conn.fetchval(
                "SELECT status FROM billing.subscriptions WHERE customer_id = $1", customer_id
            ),
            lambda s: s is not None,
            what="the trial recorded",
        )
        await first.stop()
        assert await expired_events(store, customer_id) == 0

        second = billing(0.2)
        await second.start()
        await second.wait_started()
        try:
            status = await eventually(
                lambda: conn.fetchval(
                    "SELECT status FROM billing.subscriptions WHERE customer_id = $1", customer_id
                ),
                lambda s: s == "expired",
                what="the trial expired",
            )
            assert status == "expired"
            assert await expired_events(store, customer_id) == 1
        finally:
            await second.stop()
    finally:
        await conn.close()


async def test_a_running_trial_does_not_expire(
    settings: ServiceSettings, store: EventStore
) -> None:
    platform = Platform.from_settings(settings, [BILLING], trial_scan_seconds=0.2)
    await platform.start()
    await platform.wait_started()
    customer_id = str(uuid.uuid4())
    await store.publish(
        CustomerSignedUp(
            customer_id=customer_id,
            email=f"{customer_id}@example.com",
            email_display=f"{customer_id}@example.com",
            company_name="New Air",
            signed_up_at=datetime.now(UTC),
            trial_days=14,
        ),
        customer_id=customer_id,
    )
    conn = await asyncpg.connect(settings.database_url)
    try:
        await eventually(
            lambda: conn.fetchval(
                "SELECT status FROM billing.subscriptions WHERE customer_id = $1", customer_id
            ),
            lambda s: s == "trialing",
            what="the trial recorded",
        )
        # Several scheduler passes go by (0.2 s apart); the trial stays.
        passes_later = datetime.now(UTC) + timedelta(seconds=1)
        await eventually(lambda: _now(), lambda n: n > passes_later, what="a second to pass")
        assert (
            await conn.fetchval(
                "SELECT status FROM billing.subscriptions WHERE customer_id = $1", customer_id
            )
            == "trialing"
        )
        assert await expired_events(store, customer_id) == 0
    finally:
        await conn.close()
        await platform.stop()


async def _now() -> datetime:
    return datetime.now(UTC)


async def signed_up_20_days_ago(store: EventStore, company: str) -> str:
    """A customer whose 14-day trial ended six days ago."""
    customer_id = str(uuid.uuid4())
    await store.publish(
        CustomerSignedUp(
            customer_id=customer_id,
            email=f"{customer_id}@example.com",
            email_display=f"{customer_id}@example.com",
            company_name=company,
            signed_up_at=datetime.now(UTC) - timedelta(days=20),
            trial_days=14,
        ),
        customer_id=customer_id,
    )
    return customer_id


async def status_becomes(pool: asyncpg.Pool, customer_id: str, status: str) -> None:
    await eventually(
        lambda: pool.fetchval(
            "SELECT status FROM subscriptions WHERE customer_id = $1", customer_id
        ),
        lambda s: s == status,
        what=f"the subscription {status}",
    )


@contextlib.asynccontextmanager
async def billing_with_its_pool(
    settings: ServiceSettings, scan: float
) -> AsyncIterator[tuple[Platform, asyncpg.Pool]]:
    platform = Platform.from_settings(settings, [BILLING], trial_scan_seconds=scan)
    await platform.start()
    await platform.wait_started()
    pool = await create_pool(settings.database_url, "billing")
    try:
        yield platform, pool
    finally:
        await pool.close()
        await platform.stop()


async def test_a_trial_is_not_expired_over_a_payment_the_read_model_has_not_seen(
    settings: ServiceSettings, store: EventStore
) -> None:
    # Issue 12: the scheduler expired trials the read model still showed as trialing, though
    # a SubscriptionActivated was already on the log: a paying customer went read-only.
    async with billing_with_its_pool(settings, 3600) as (platform, pool):
        customer_id = await signed_up_20_days_ago(store, "Paying Air")
        await status_becomes(pool, customer_id, "trialing")
        # The payment reaches the log while the projection is not applying anything.
        await platform.stop()
        await store.publish(
            SubscriptionActivated(
                customer_id=customer_id,
                plan="professional",
                status="active",
                stripe_customer_id="cus_paying",
                stripe_subscription_id="sub_paying",
            ),
            customer_id=customer_id,
        )
        assert await expire_ended_trials(pool, store, datetime.now(UTC)) == 0
        assert await expired_events(store, customer_id) == 0
    # Once billing runs again it sees the payment, and no later pass expires the trial.
    async with billing_with_its_pool(settings, 0.2) as (_, pool):
        await status_becomes(pool, customer_id, "active")
        assert await expire_ended_trials(pool, store, datetime.now(UTC)) == 0
        assert await expired_events(store, customer_id) == 0


async def test_an_ended_trial_with_nothing_newer_on_the_log_expires_once(
    settings: ServiceSettings, store: EventStore
) -> None:
    async with billing_with_its_pool(settings, 3600) as (_, pool):
        customer_id = await signed_up_20_days_ago(store, "Unpaid Air")
        await status_becomes(pool, customer_id, "trialing")
        assert await expire_ended_trials(pool, store, datetime.now(UTC)) == 1
        await status_becomes(pool, customer_id, "expired")
        # A second pass (a restart, another replica) finds it expired: nothing more.
        assert await expire_ended_trials(pool, store, datetime.now(UTC)) == 0
        assert await expired_events(store, customer_id) == 1
