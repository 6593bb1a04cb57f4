"""One license reactor handler, run alone on a real Postgres: what it writes, and only once."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from contracts import (
    CustomerSignedUp,
    LicenseIssued,
    SubscriptionChanged,
    decode_envelope,
    decode_event,
    new_envelope,
)
from contracts.license_verify import LicenseVerifier
from libs.db.postgres import create_pool, migrate, service_migrations
from libs.projections.apply import Recorded
from services.licensing.app import LICENSING
from services.licensing.issuing import LicenseSigner
from services.licensing.keys import load_keyring
from services.licensing.reactors import (
    when_customer_signed_up_issue_trial_license,
    when_subscription_active_issue_subscription_license,
)
from support import license_keys_dir

SIGNED_UP = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, LICENSING.schema)
    async with pool.acquire() as conn:
        await migrate(conn, LICENSING.schema, service_migrations(LICENSING.migrations_package))
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture(scope="module")
def signer() -> LicenseSigner:
    return LicenseSigner(load_keyring(Path(license_keys_dir())))


def recorded(event: CustomerSignedUp | SubscriptionChanged) -> Recorded[Any]:
    envelope = new_envelope(event, customer_id=event.customer_id, occurred_at=SIGNED_UP)
    return Recorded(seq=1, envelope=envelope, event=event)


async def outbox(conn: asyncpg.Connection, customer_id: str) -> list[LicenseIssued]:
    found = []
    for row in await conn.fetch("SELECT envelope FROM outbox ORDER BY id"):
        envelope = decode_envelope(row["envelope"])
        event = decode_event(envelope)
        if isinstance(event, LicenseIssued) and event.customer_id == customer_id:
            found.append(event)
    return found


async def test_a_signup_gets_a_trial_license_in_the_outbox_once(pool, signer) -> None:
    customer_id = str(uuid.uuid4())
    r = recorded(
        CustomerSignedUp(
            customer_id=customer_id,
            email="air@example.com",
            email_display="air@example.com",
            company_name="Clean Air",
            plan="professional",
            signed_up_at=SIGNED_UP,
        )
    )
    async with pool.acquire() as conn:
        for _ in range(2):  # a redelivery answers the same, and the outbox keeps one
            async with conn.transaction():
                await when_customer_signed_up_issue_trial_license(signer, conn, r)
        [issued] = await outbox(conn, customer_id)
        plan = await conn.fetchrow(
            "SELECT plan, subscription_status FROM license_plans WHERE customer_id = $1",
            customer_id,
        )
    assert (issued.license_type, issued.plan) == ("trial_signup", "professional")
    assert issued.issued_at == SIGNED_UP
    assert issued.expires_at == SIGNED_UP + timedelta(days=14)
    assert issued.kid == signer.kid
    claims = LicenseVerifier.from_jwks(signer.keyring.jwks()).verify(issued.jwt, now=SIGNED_UP)
    assert (claims.customerId, claims.licenseId) == (customer_id, issued.license_id)
    assert dict(plan) == {"plan": "professional", "subscription_status": "trialing"}


async def test_a_past_due_subscription_change_remembers_the_plan_but_issues_nothing(
    pool, signer
) -> None:
    customer_id = str(uuid.uuid4())
    r = recorded(
        SubscriptionChanged(
            customer_id=customer_id,
            plan="enterprise",
            status="past_due",
            stripe_subscription_id="sub_1",
            current_period_end=SIGNED_UP + timedelta(days=30),
        )
    )
    async with pool.acquire() as conn, conn.transaction():
        await when_subscription_active_issue_subscription_license(signer, conn, r)
        assert await outbox(conn, customer_id) == []
        status = await conn.fetchval(
            "SELECT subscription_status FROM license_plans WHERE customer_id = $1", customer_id
        )
    assert status == "past_due"
