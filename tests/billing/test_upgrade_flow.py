"""The license follows billing: signup, a Stripe subscription, a failed payment, the end."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.runtime.platform import Platform
from services.billing.app import BILLING
from services.licensing.app import LICENSING
from services.signup.app import SIGNUP
from services.targets import build_app
from stripe_signing import SECRET, sign
from support import assert_replays_clean, eventually, license_keys_dir, serving

PRO_PRICE = "price_pro_monthly"


@pytest.fixture(scope="module")
async def platform(settings: ServiceSettings, store: EventStore) -> Platform:
    return Platform.from_settings(
        settings,
        [SIGNUP, LICENSING, BILLING],
        license_keys_dir=license_keys_dir(),
        stripe_webhook_secret=SECRET,
        stripe_price_professional=PRO_PRICE,
        argon2_memory_kib=8192,
        argon2_time_cost=1,
    )


@pytest.fixture(scope="module")
async def client(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(build_app(platform, "all")) as http:
        await platform.wait_started()
        yield http


async def webhook(
    client: httpx.AsyncClient, event_type: str, obj: dict[str, Any], created: int
) -> None:
    payload = json.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex[:24]}",
            "object": "event",
            "created": created,
            "livemode": False,
            "api_version": "2024-06-20",
            "type": event_type,
            "data": {"object": obj},
        }
    ).encode()
    response = await client.post(
        "/webhooks/stripe", content=payload, headers={"Stripe-Signature": sign(payload)}
    )
    assert response.status_code == 200, response.text


async def test_the_license_follows_the_subscription(client, platform, store) -> None:
    signed = await client.post(
        "/api/customers/signup",
        json={
            "email": "upgrade@example.com",
            "password": "a long passphrase",
            "company_name": "Upgrading Air",
        },
    )
    assert signed.status_code == 201
    customer_id = signed.json()["customer"]["customer_id"]
    token = (
        await client.post(
            "/api/customers/login",
            json={"email": "upgrade@example.com", "password": "a long passphrase"},
        )
    ).json()["token"]
    auth = {"Authorization": f"Bearer {token}"}

    async def me() -> dict[str, Any]:
        return (await client.get("/api/customers/me", headers=auth)).json()

    now = int(time.time())
    sub = {
        "id": "sub_upgrade1",
        "object": "subscription",
        "customer": "cus_upgrade1",
        "status": "active",
        "current_period_end": now + 30 * 86400,
        "items": {"data": [{"price": {"id": PRO_PRICE}}]},
        "metadata": {"customer_id": customer_id},
    }
    await webhook(
        client,
        "checkout.session.completed",
        {
            "id": "cs_1",
            "object": "checkout.session",
            "customer": "cus_upgrade1",
            "subscription": "sub_upgrade1",
            "client_reference_id": customer_id,
            "metadata": {"customer_id": customer_id},
        },
        now,
    )
    await webhook(client, "customer.subscription.created", sub, now + 1)
    view = await eventually(
        me, lambda v: v["license"]["plan"] == "professional", what="a professional license"
    )
    assert view["subscription"]["plan"] == "professional"
    assert view["subscription"]["status"] == "active"
    assert view["license"]["features"]["webhooks"] is True

    await webhook(
        client,
        "invoice.payment_failed",
        {
            "id": "in_1",
            "object": "invoice",
            "subscription": "sub_upgrade1",
            "amount_due": 9900,
            "currency": "eur",
            "attempt_count": 1,
        },
        now + 2,
    )
    await eventually(me, lambda v: v["subscription"]["status"] == "past_due", what="past due")

    await webhook(
        client,
        "customer.subscription.deleted",
        {**sub, "status": "canceled", "canceled_at": now + 3},
        now + 3,
    )
    view = await eventually(
        me, lambda v: v["subscription"]["status"] == "canceled", what="canceled"
    )
    final = await eventually(
        lambda: client.get(f"/api/licenses/{customer_id}/history", headers=auth),
        lambda r: len(r.json().get("history", [])) == 4,
        what="four licenses in the history",
    )
    kinds = [h["license_type"] for h in final.json()["history"]]
    assert kinds == ["trial_signup", "subscription", "grace", "final"]
    view = await eventually(
        me,
        lambda v: (
            v["license"]["plan"] == "professional"
            and datetime.fromisoformat(v["license"]["expires_at"]) <= datetime.now(UTC)
        ),
        what="the final license in the account view",
    )

    await assert_replays_clean(platform.settings.database_url, store, [SIGNUP, LICENSING, BILLING])
