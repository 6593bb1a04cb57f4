"""Checkout, the billing portal and the subscription view, against a STAND-IN for Stripe's API.

Stripe's HTTP API cannot be reached from here, so ``tests/stripe_standin.py`` (labelled as a
stand-in) answers the calls the ``stripe`` package makes; everything of ours is real: the
services, Postgres, NATS, and webhooks signed as Stripe signs them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from contracts import decode_envelope
from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.runtime.platform import Platform
from services.billing.app import BILLING
from services.billing.settings import BillingSettings
from services.billing.stripe_api import StripeGateway, StripeNotConfigured, StripeUnavailable
from services.licensing.app import LICENSING
from services.signup.app import SIGNUP
from services.targets import build_app
from stripe_signing import SECRET, sign
from stripe_standin import API_KEY, StripeStandIn
from support import SUITE_SIGNUP_LIMITS, assert_replays_clean, eventually, license_keys_dir, serving

PRICES = {
    "starter": "price_starter_m",
    "professional": "price_pro_m",
    "enterprise": "price_ent_m",
}
PASSWORD = "a long passphrase"


@pytest.fixture(scope="module")
async def stripe_api() -> AsyncIterator[tuple[StripeStandIn, str]]:
    standin = StripeStandIn(prices=set(PRICES.values()))
    async with serving(standin.app()) as http:
        yield standin, str(http.base_url)


@pytest.fixture(scope="module")
async def platform(settings: ServiceSettings, store: EventStore, stripe_api) -> Platform:
    return Platform.from_settings(
        settings,
        [SIGNUP, LICENSING, BILLING],
        license_keys_dir=license_keys_dir(),
        stripe_webhook_secret=SECRET,
        stripe_secret_key=API_KEY,
        stripe_api_base=stripe_api[1],
        stripe_price_starter=PRICES["starter"],
        stripe_price_professional=PRICES["professional"],
        stripe_price_enterprise=PRICES["enterprise"],
        billing_return_url="https://app.example.com/account",
        argon2_memory_kib=8192,
        argon2_time_cost=1,
        **SUITE_SIGNUP_LIMITS,
    )


@pytest.fixture(scope="module")
async def client(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(build_app(platform, "all")) as http:
        await platform.wait_started()
        yield http


async def customer(client: httpx.AsyncClient, email: str) -> tuple[str, dict[str, str]]:
    """A signed-up customer's id and session header, once billing knows them."""
    signed = await client.post(
        "/api/customers/signup",
        json={"email": email, "password": PASSWORD, "company_name": "Checkout Air"},
    )
    assert signed.status_code == 201, signed.text
    token = (
        await client.post("/api/customers/login", json={"email": email, "password": PASSWORD})
    ).json()["token"]
    auth = {"Authorization": f"Bearer {token}"}
    await eventually(
        lambda: client.get("/api/billing/subscription", headers=auth),
        lambda r: r.status_code == 200,
        what="billing knows the customer",
    )
    return signed.json()["customer"]["customer_id"], auth


async def post_webhook(client: httpx.AsyncClient, event: dict[str, Any]) -> None:
    payload = json.dumps(event).encode()
    answer = await client.post(
        "/webhooks/stripe", content=payload, headers={"Stripe-Signature": sign(payload)}
    )
    assert answer.status_code == 200, answer.text


async def links(store: EventStore, customer_id: str) -> list[str]:
    found = []
    async for message in store.read(event_types=["StripeCustomerLinked"]):
        envelope = decode_envelope(message.data)
        if envelope.customer_id == customer_id:
            found.append(json.loads(bytes(envelope.data))["stripe_customer_id"])
    return found


async def test_the_subscription_view_shows_the_trial(client) -> None:
    _, auth = await customer(client, "trial-view@example.com")
    view = (await client.get("/api/billing/subscription", headers=auth)).json()
    assert view["plan"] == "starter"
    assert view["status"] == "trialing"
    assert view["trial_days_remaining"] == 14
    assert view["stripe_customer_id"] is None


async def test_checkout_creates_the_stripe_customer_once_and_a_session_for_the_plan(
    client, stripe_api, store
) -> None:
    standin, _ = stripe_api
    customer_id, auth = await customer(client, "checkout@example.com")

    answer = await client.post("/api/billing/checkout", json={"plan": "professional"}, headers=auth)
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["checkout_url"].startswith("https://checkout.stripe.com/c/pay/cs_test_")
    assert body["plan"] == "professional"
    session = standin.sessions[body["session_id"]]
    assert session["_price"] == PRICES["professional"]
    assert session["_subscription_metadata"] == {"customer_id": customer_id, "plan": "professional"}
    assert session["client_reference_id"] == customer_id
    assert session["success_url"].startswith("https://app.example.com/account?checkout=success")
    created = [
        c for c in standin.customers.values() if c["metadata"] == {"customer_id": customer_id}
    ]
    assert len(created) == 1
    assert created[0]["email"] == "checkout@example.com"
    assert created[0]["name"] == "Checkout Air"

    # The mapping is on the log and in billing's view; a second checkout reuses the customer.
    view = await eventually(
        lambda: client.get("/api/billing/subscription", headers=auth),
        lambda r: r.json()["stripe_customer_id"] is not None,
        what="the Stripe customer in the subscription view",
    )
    assert view.json()["stripe_customer_id"] == created[0]["id"]
    again = await client.post("/api/billing/checkout", json={"plan": "enterprise"}, headers=auth)
    assert again.status_code == 201, again.text
    assert standin.sessions[again.json()["session_id"]]["customer"] == created[0]["id"]
    assert [
        c for c in standin.customers.values() if c["metadata"] == {"customer_id": customer_id}
    ] == created
    assert await links(store, customer_id) == [created[0]["id"]]


async def test_concurrent_first_checkouts_make_one_stripe_customer(
    client, stripe_api, store
) -> None:
    standin, _ = stripe_api
    customer_id, auth = await customer(client, "racing-checkout@example.com")
    answers = await asyncio.gather(
        *(
            client.post("/api/billing/checkout", json={"plan": "starter"}, headers=auth)
            for _ in range(6)
        )
    )
    assert [a.status_code for a in answers] == [201] * 6
    mine = [
        c["id"] for c in standin.customers.values() if c["metadata"]["customer_id"] == customer_id
    ]
    assert len(mine) == 1
    assert {standin.sessions[a.json()["session_id"]]["customer"] for a in answers} == set(mine)
    assert await links(store, customer_id) == mine


async def test_a_retried_checkout_with_its_idempotency_key_gets_the_same_session(client) -> None:
    _, auth = await customer(client, "retry-checkout@example.com")
    headers = {**auth, "Idempotency-Key": "click-1"}
    first = await client.post("/api/billing/checkout", json={"plan": "starter"}, headers=headers)
    second = await client.post("/api/billing/checkout", json={"plan": "starter"}, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json()["session_id"] == second.json()["session_id"]


async def test_bad_checkout_requests_are_refused_with_the_reason(client) -> None:
    assert (await client.post("/api/billing/checkout", json={"plan": "starter"})).status_code == 401
    forged = {"Authorization": "Bearer not-a-session"}
    assert (
        await client.post("/api/billing/checkout", json={"plan": "starter"}, headers=forged)
    ).status_code == 401
    assert (await client.get("/api/billing/subscription")).status_code == 401
    _, auth = await customer(client, "bad-checkout@example.com")
    cases = [
        ({"plan": "platinum"}, "plan"),
        ({"plan": "trial"}, "plan"),
        ({}, "plan"),
        ({"plan": "starter", "coupon": "FREE"}, "coupon"),
        (["starter"], "body"),
    ]
    for body, field in cases:
        answer = await client.post("/api/billing/checkout", json=body, headers=auth)
        assert answer.status_code == 400, (body, answer.text)
        assert field in [f["field"] for f in answer.json()["error"]["fields"]], body
    not_json = await client.post(
        "/api/billing/checkout",
        content=b"{plan",
        headers={**auth, "Content-Type": "application/json"},
    )
    assert not_json.status_code == 400
    portal = await client.post("/api/billing/portal", headers=auth)
    assert portal.status_code == 409
    assert "checkout" in portal.json()["error"]["message"]


async def test_stripe_failures_answer_502_and_record_nothing(client, stripe_api, store) -> None:
    standin, _ = stripe_api
    customer_id, auth = await customer(client, "stripe-down@example.com")
    standin.fail_next = 3  # the first try and the stripe package's two retries
    answer = await client.post("/api/billing/checkout", json={"plan": "starter"}, headers=auth)
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "payment_provider_error"
    assert "Traceback" not in answer.text
    assert await links(store, customer_id) == []

    standin.fail_next = 1  # one failure is retried by the stripe package with the same key
    answer = await client.post("/api/billing/checkout", json={"plan": "starter"}, headers=auth)
    assert answer.status_code == 201, answer.text
    mine = [
        c["id"] for c in standin.customers.values() if c["metadata"]["customer_id"] == customer_id
    ]
    assert len(mine) == 1


async def test_without_a_key_or_with_a_wrong_one_the_gateway_refuses(stripe_api) -> None:
    _, base = stripe_api
    unset = StripeGateway(BillingSettings(stripe_api_base=base))
    with pytest.raises(StripeNotConfigured):
        await unset.create_customer("c-1", None, None)
    wrong = StripeGateway(
        BillingSettings(stripe_api_base=base, stripe_secret_key="sk_test_wrong_key_123")
    )
    with pytest.raises(StripeUnavailable):
        await wrong.create_customer("c-1", None, None)
    no_price = StripeGateway(BillingSettings(stripe_api_base=base, stripe_secret_key=API_KEY))
    with pytest.raises(StripeNotConfigured):
        await no_price.create_checkout(
            customer_id="c-1", stripe_customer_id="cus_1", plan="starter", attempt="a"
        )


async def test_upgrade_from_the_checkout_url_to_a_professional_license(
    client, stripe_api, platform, store
) -> None:
    standin, _ = stripe_api
    customer_id, auth = await customer(client, "upgrade-e2e@example.com")
    me = await client.get("/api/customers/me", headers=auth)
    assert me.json()["subscription"]["status"] == "trialing"

    checkout = await client.post(
        "/api/billing/checkout", json={"plan": "professional"}, headers=auth
    )
    assert checkout.status_code == 201, checkout.text
    # The customer pays on Stripe's page; Stripe sends its webhooks, signed.
    for event in standin.complete_checkout(checkout.json()["session_id"]):
        await post_webhook(client, event)

    view = await eventually(
        lambda: client.get("/api/customers/me", headers=auth),
        lambda r: r.json()["license"]["plan"] == "professional",
        what="a professional license in the account view",
    )
    assert view.json()["subscription"] == {
        **view.json()["subscription"],
        "plan": "professional",
        "status": "active",
    }
    subscription = (await client.get("/api/billing/subscription", headers=auth)).json()
    assert subscription["plan"] == "professional"
    assert subscription["status"] == "active"
    assert subscription["stripe_subscription_id"].startswith("sub_")
    # The two-ID mapping: Stripe's customer names ours, and ours keeps Stripe's.
    stripe_customer = standin.customers[subscription["stripe_customer_id"]]
    assert stripe_customer["metadata"] == {"customer_id": customer_id}

    again = await client.post("/api/billing/checkout", json={"plan": "enterprise"}, headers=auth)
    assert again.status_code == 409
    assert "portal" in again.json()["error"]["message"]
    portal = await client.post("/api/billing/portal", headers=auth)
    assert portal.status_code == 201, portal.text
    assert portal.json()["portal_url"].startswith("https://billing.stripe.com/p/session/")
    path, sent = standin.requests[-1]
    assert path == "/v1/billing_portal/sessions"
    assert sent == {
        "customer": subscription["stripe_customer_id"],
        "return_url": "https://app.example.com/account",
    }
    await assert_replays_clean(platform.settings.database_url, store, [SIGNUP, LICENSING, BILLING])
