"""Billing honours what signup decided about an account: a session from before a password reset
or of a closed account is refused, a closed account's trial never expires, and nothing is sold
to it. Signup, licensing and billing on real Postgres and JetStream; the reset and the closure
go through signup's own API, as a customer does them."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
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

from contracts import CustomerClosed, CustomerSignedUp, SubscriptionActivated, decode_envelope
from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.http.errors import Conflict
from libs.projections.runner import durable_name
from libs.runtime.platform import Platform
from services.billing.accounts import AccountClosed, BillingAccounts
from services.billing.app import BILLING
from services.billing.settings import BillingSettings
from services.billing.stripe_api import StripeGateway
from services.billing.trials import expire_ended_trials
from services.licensing.app import LICENSING
from services.signup.app import SIGNUP
from services.targets import build_app
from stripe_standin import API_KEY, StripeStandIn
from support import SUITE_SIGNUP_LIMITS, eventually, license_keys_dir, serving

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture(scope="module")
async def stripe_api() -> AsyncIterator[tuple[StripeStandIn, str]]:
    standin = StripeStandIn()
    async with serving(standin.app()) as http:
        yield standin, str(http.base_url)


@pytest.fixture(scope="module")
async def platform(settings: ServiceSettings, store: EventStore, stripe_api) -> Platform:
    return Platform.from_settings(
        settings,
        [SIGNUP, LICENSING, BILLING],
        license_keys_dir=license_keys_dir(),
        stripe_secret_key=API_KEY,
        stripe_api_base=stripe_api[1],
        argon2_memory_kib=8192,
        argon2_time_cost=1,
        public_url=PUBLIC_URL,
        # The trial scheduler runs only when a test runs it.
        trial_scan_seconds=3600,
        **SUITE_SIGNUP_LIMITS,
    )


@pytest.fixture(scope="module")
async def client(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(build_app(platform, "all")) as http:
        await platform.wait_started()
        yield http


async def subscription(client: httpx.AsyncClient, session: str) -> httpx.Response:
    return await client.get("/api/billing/subscription", headers=bearer(session))


async def refused_everywhere(client: httpx.AsyncClient, session: str) -> None:
    """Every customer route of billing answers the session as if it had expired."""
    headers = bearer(session)
    answers = [
        await client.get("/api/billing/subscription", headers=headers),
        await client.get("/api/billing/usage", headers=headers),
        await client.post("/api/billing/checkout", json={"plan": "starter"}, headers=headers),
        await client.post("/api/billing/portal", headers=headers),
    ]
    for answer in answers:
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["message"] == SESSION_REFUSED


async def test_a_session_from_before_a_password_reset_is_refused_and_a_new_one_works(
    client, platform
) -> None:
    email = new_email("billing-reset")
    await sign_up(client, email)
    old = await log_in(client, email)
    await eventually(lambda: subscription(client, old), lambda r: r.status_code == 200)

    new = await reset_password(client, platform, email)
    await eventually(
        lambda: subscription(client, old), lambda r: r.status_code == 401, what="old refused"
    )
    await refused_everywhere(client, old)
    assert (await subscription(client, new)).status_code == 200
    usage = await client.get("/api/billing/usage", headers=bearer(new))
    assert usage.status_code == 200
    # A forged or expired token gets the very same answer: nothing says why.
    forged = await subscription(client, old[:-4] + "AAAA")
    assert forged.status_code == 401
    assert forged.json()["error"]["message"] == SESSION_REFUSED


async def test_a_closed_accounts_session_is_refused_and_its_forms_ask_to_sign_in(
    client, platform
) -> None:
    email = new_email("billing-closed")
    await sign_up(client, email)
    session = await log_in(client, email)
    await eventually(lambda: subscription(client, session), lambda r: r.status_code == 200)
    # A browser that opened the login page (its CSRF cookie and token) and kept the session.
    async with httpx.AsyncClient(base_url=str(client.base_url)) as browser:
        page = await browser.get("/login")
        found = CSRF.search(page.text)
        assert found, page.text
        token = found.group(1)
        await close_account(client, session)
        await eventually(
            lambda: subscription(client, session), lambda r: r.status_code == 401, what="refused"
        )
        await refused_everywhere(client, session)
        browser.cookies.set("iotistic_account", session)
        for path, data in (
            ("/account/upgrade", {"csrf_token": token, "plan": "professional"}),
            ("/account/billing", {"csrf_token": token}),
        ):
            answer = await browser.post(path, data=data)
            assert answer.status_code == 303, answer.text
            assert answer.headers["location"] == "/account?problem=not_signed_in"


async def test_checkout_and_the_portal_refuse_a_closed_account(client, platform) -> None:
    email = new_email("billing-no-sale")
    customer_id = await sign_up(client, email)
    session = await log_in(client, email)
    await eventually(lambda: subscription(client, session), lambda r: r.status_code == 200)
    await close_account(client, session)
    await eventually(lambda: subscription(client, session), lambda r: r.status_code == 401)
    # Past the session check (a request that passed it a moment before the closure arrived),
    # the command itself refuses: a clear 409, before any call to Stripe.
    runtime = platform.runtime_of("billing")
    accounts = BillingAccounts(
        runtime.db(), runtime.events(), StripeGateway(runtime.settings_as(BillingSettings))
    )
    with pytest.raises(AccountClosed) as refused:
        await accounts.checkout(customer_id, "professional", uuid.uuid4().hex)
    assert refused.value.status_code == 409 and refused.value.code == "account_closed"
    with pytest.raises(Conflict) as no_portal:
        await accounts.portal(customer_id)
    assert no_portal.value.code == "account_closed"


async def expired_events(store: EventStore, customer_id: str) -> int:
    count = 0
    async for stored in store.read(event_types=["TrialExpired"]):
        count += decode_envelope(stored.data).customer_id == customer_id
    return count


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


async def trialing(platform: Platform, customer_id: str) -> None:
    pool = platform.runtime_of("billing").db()
    await eventually(
        lambda: pool.fetchval(
            "SELECT status FROM subscriptions WHERE customer_id = $1", customer_id
        ),
        lambda s: s == "trialing",
        what="the trial",
    )


async def test_a_closed_trial_never_expires_even_when_the_scheduler_runs_at_the_closure(
    client, platform, store
) -> None:
    pool = platform.runtime_of("billing").db()
    closed = await signed_up_20_days_ago(store, "Closed Air")
    closed_at_once = await signed_up_20_days_ago(store, "Raced Air")
    unpaid = await signed_up_20_days_ago(store, "Unpaid Air")
    for customer_id in (closed, closed_at_once, unpaid):
        await trialing(platform, customer_id)
    # Signup's closure (a customer's own), on the log as signup appends it.
    await store.publish(
        CustomerClosed(customer_id=closed, closed_by="customer"), customer_id=closed
    )
    await eventually(
        lambda: pool.fetchval(
            "SELECT closed_at FROM account_access WHERE customer_id = $1", closed
        ),
        what="billing sees the closure",
    )
    # This one's closure reaches the log just before the scheduler runs, before billing's read
    # models may have applied it: the decision, taken against the log, still leaves it alone.
    await store.publish(
        CustomerClosed(customer_id=closed_at_once, closed_by="admin"),
        customer_id=closed_at_once,
    )
    # The scheduler runs past every trial's end: only the open account's trial expires.
    later = datetime.now(UTC) + timedelta(days=30)
    await expire_ended_trials(pool, store, later)
    await expire_ended_trials(pool, store, later)
    assert await expired_events(store, unpaid) == 1
    assert await expired_events(store, closed) == 0
    assert await expired_events(store, closed_at_once) == 0


def activated(customer_id: str, subscription_id: str) -> SubscriptionActivated:
    return SubscriptionActivated(
        customer_id=customer_id,
        plan="professional",
        status="active",
        stripe_customer_id=f"cus_{subscription_id}",
        stripe_subscription_id=subscription_id,
    )


async def test_a_subscription_that_raced_the_closure_is_canceled_at_stripe_once(
    client, platform, store, stripe_api
) -> None:
    standin, _ = stripe_api
    # Paid, then closed (an admin's closure, which signup's own API would refuse while it
    # bills): billing cancels the subscription at Stripe.
    paid_first = await signed_up_20_days_ago(store, "Paid First Air")
    await store.publish(activated(paid_first, "sub_paid_first"), customer_id=paid_first)
    await store.publish(
        CustomerClosed(customer_id=paid_first, closed_by="admin"), customer_id=paid_first
    )
    # Closed, then a checkout that started before the closure completes at Stripe.
    closed_first = await signed_up_20_days_ago(store, "Closed First Air")
    await store.publish(
        CustomerClosed(customer_id=closed_first, closed_by="customer"), customer_id=closed_first
    )
    await store.publish(activated(closed_first, "sub_closed_first"), customer_id=closed_first)
    # The closure again (closed by an admin too): nothing more is asked of Stripe.
    await store.publish(
        CustomerClosed(customer_id=paid_first, closed_by="admin"), customer_id=paid_first
    )
    # An open account's subscription is left alone.
    open_one = await signed_up_20_days_ago(store, "Open Air")
    await store.publish(activated(open_one, "sub_open"), customer_id=open_one)

    durable = durable_name("billing", "cancel_closed_subscriptions")
    await eventually(lambda: store.consumer_pending(durable), lambda n: n == 0, what="reactor")
    await eventually(lambda: _canceled(standin), lambda c: len(c) >= 2, what="two cancellations")
    assert sorted(standin.canceled) == ["sub_closed_first", "sub_paid_first"]
    cancels = [path for path, _ in standin.requests if path.startswith("/v1/subscriptions/")]
    assert sorted(cancels) == [
        "/v1/subscriptions/sub_closed_first",
        "/v1/subscriptions/sub_paid_first",
    ]


async def _canceled(standin: StripeStandIn) -> list[str]:
    return list(standin.canceled)
