"""The customer's pages, in Chromium and over HTTP: sign up, watch the instance come up, upgrade
through Checkout, and the forms' defences (CSRF, origins, redirects, cookies, other customers).

The control plane runs every service with the local provisioning backend (a real instance per
customer), and Stripe is the labelled STAND-IN (``tests/stripe_standin.py``) serving its own
Checkout page, whose "Pay" posts signed webhooks to billing as Stripe would.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
from browser import check_page, new_page, open_browser

from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.runtime.platform import Platform
from libs.servers.mosquitto import EmbeddedMosquitto
from services.signup.progress import STREAMS_PER_CUSTOMER, may_open_stream, progress_events
from services.targets import CONTROL_PLANE, build_app
from stripe_signing import SECRET
from stripe_standin import API_KEY, StripeStandIn
from support import eventually, local_backend_settings, serving

pytestmark = pytest.mark.slow

PASSWORD = "a long passphrase for pages"
PRICES = {plan: f"price_{plan}_pages" for plan in ("starter", "professional", "enterprise")}
MEMBER = "member@example.com"
TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture(scope="module")
async def standin() -> AsyncIterator[StripeStandIn]:
    stand_in = StripeStandIn(prices=set(PRICES.values()), webhook_secret=SECRET)
    async with serving(stand_in.app()) as http:
        stand_in.base_url = str(http.base_url).rstrip("/")
        yield stand_in


@pytest.fixture(scope="module")
async def base_url(
    settings: ServiceSettings,
    store: EventStore,
    broker: EmbeddedMosquitto,
    port: int,
    standin: StripeStandIn,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[str]:
    url = f"http://127.0.0.1:{port}"
    standin.webhook_url = f"{url}/webhooks/stripe"
    platform = Platform.from_settings(
        settings,
        list(CONTROL_PLANE.values()),
        **local_backend_settings(broker, port, tmp_path_factory.mktemp("instances")),
        stripe_secret_key=API_KEY,
        stripe_api_base=standin.base_url,
        stripe_webhook_secret=SECRET,
        stripe_price_starter=PRICES["starter"],
        stripe_price_professional=PRICES["professional"],
        stripe_price_enterprise=PRICES["enterprise"],
        billing_return_url=f"{url}/account",
        payment_form_origins=standin.base_url,
    )
    async with serving(build_app(platform, "all"), port):
        await platform.wait_started()
        yield url


@pytest.fixture
async def browser_client(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client with a cookie jar of its own, as a browser would be."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        yield client


async def csrf_token(client: httpx.AsyncClient, path: str) -> str:
    page = await client.get(path)
    assert page.status_code == 200, page.text
    found = TOKEN.search(page.text)
    assert found, page.text
    return found.group(1)


async def sign_up(client: httpx.AsyncClient, email: str) -> httpx.Response:
    token = await csrf_token(client, "/signup")
    return await client.post(
        "/signup",
        data={
            "csrf_token": token,
            "email": email,
            "company_name": "Pages Air",
            "password": PASSWORD,
        },
    )


@pytest.fixture(scope="module")
async def member(base_url: str) -> str:
    """A customer signed up once for the tests that only need to sign in (each signup starts
    an instance)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        assert (await sign_up(client, MEMBER)).status_code == 303
    return MEMBER


async def sign_in(client: httpx.AsyncClient, email: str, next_path: str = "") -> httpx.Response:
    token = await csrf_token(client, "/login")
    return await client.post(
        "/login",
        data={"csrf_token": token, "email": email, "password": PASSWORD, "next": next_path},
    )


def set_cookies(response: httpx.Response) -> dict[str, str]:
    """Each Set-Cookie of a response by name, as sent."""
    return {
        header.split("=", 1)[0]: header.lower()
        for header in response.headers.get_list("set-cookie")
    }


# --- in the browser --------------------------------------------------------------------------


async def test_sign_up_watch_the_instance_come_up_and_upgrade(
    base_url: str, standin: StripeStandIn
) -> None:
    async with open_browser() as browser:
        page = await new_page(
            browser, base_url=base_url, permissions=["clipboard-read", "clipboard-write"]
        )
        await page.goto("/signup")
        await check_page(page, "signup")

        await page.fill("#f-email", "not-an-email")
        await page.fill("#f-company_name", "Browser Air")
        await page.fill("#f-password", "short")
        await page.click("button[type=submit]")
        await page.wait_for_selector("#f-email-error")
        assert await page.input_value("#f-company_name") == "Browser Air"
        assert await page.input_value("#f-password") == ""
        assert "at least 8 characters" in await page.inner_text("#f-password-error")
        await check_page(page, "signup-errors")

        await page.fill("#f-email", "browser@example.com")
        await page.type("#f-password", "Quiet Harbour 42 lanterns")
        assert "strong" in await page.inner_text("#password-strength .strength-label")
        await page.click("button[type=submit]")
        await page.wait_for_url(f"{base_url}/account")
        assert "browser@example.com" in await page.inner_text("main")
        await check_page(page, "account-deploying")

        # The server-sent events move the page to ready, without a reload.
        link = page.locator('a[data-field="instance"]')
        await link.wait_for(state="visible", timeout=90_000)
        assert (await page.inner_text('[data-field="label"]')) == "Ready"
        instance_url = await link.get_attribute("href")
        assert instance_url and instance_url.startswith("http://127.0.0.1:")
        await check_page(page, "account-ready")

        await page.click("text=Copy license")
        copied = await page.evaluate("() => navigator.clipboard.readText()")
        assert copied == await page.input_value("#license-jwt") and copied.count(".") == 2
        async with page.expect_download() as downloading:
            await page.click("text=Download license")
        download = await downloading.value
        assert download.suggested_filename == "iotistic-license.jwt"
        saved = Path(await download.path())
        assert await asyncio.to_thread(saved.read_text) == copied

        await page.click("text=Upgrade to Professional")
        await page.wait_for_url(re.compile(r"/c/pay/cs_test_"))
        assert "STAND-IN for Stripe" in await page.inner_text("body")
        await check_page(page, "stripe-standin-checkout")
        await page.click("text=Pay")
        await page.wait_for_url(re.compile(r"/account\?checkout=success"))
        assert "payment went through" in await page.inner_text("main")

        async def plan_shown() -> str:
            await page.goto("/account")
            return await page.inner_text('[data-field="plan"]')

        await eventually(plan_shown, lambda plan: plan == "Professional", what="the new plan")
        assert "Upgrade to" not in await page.inner_text("main")  # the portal changes plans now
        await check_page(page, "account-upgraded")
        await page.click("text=Manage billing")
        await page.wait_for_url(re.compile(r"/p/session/test_"))
        await check_page(page, "stripe-standin-portal")
        await page.click("text=Return to your account")
        await page.wait_for_url(f"{base_url}/account")
        assert [kind for kind, status in standin.webhooks_sent if status == 200] == [
            "checkout.session.completed",
            "customer.subscription.created",
            "invoice.paid",
        ]

        await page.click("text=Sign out")
        await page.wait_for_url(re.compile(r"/login"))
        await page.fill("#f-email", "browser@example.com")
        await page.fill("#f-password", "not the password")
        await page.click("main button[type=submit]")
        await page.wait_for_selector(".problem")
        assert "do not match" in await page.inner_text(".problem")
        await check_page(page, "login")
        await page.fill("#f-password", "Quiet Harbour 42 lanterns")
        await page.click("main button[type=submit]")
        await page.wait_for_url(f"{base_url}/account")


# --- over HTTP -------------------------------------------------------------------------------


async def test_signup_errors_are_named_by_field_and_keep_values_but_not_the_password(
    browser_client: httpx.AsyncClient,
) -> None:
    token = await csrf_token(browser_client, "/signup")
    answer = await browser_client.post(
        "/signup",
        data={
            "csrf_token": token,
            "email": "nobody@",
            "company_name": "Kept <b>Air</b>",
            "password": "hunter2secretish" * 10,
        },
    )
    assert answer.status_code == 400
    assert 'id="f-email-error"' in answer.text
    assert "Password must be at most 128 characters" in answer.text
    assert 'value="Kept &lt;b&gt;Air&lt;/b&gt;"' in answer.text
    assert "hunter2secretish" not in answer.text


async def test_the_session_and_form_cookies_are_httponly_and_samesite(
    browser_client: httpx.AsyncClient,
) -> None:
    form = await browser_client.get("/signup")
    csrf_cookie = set_cookies(form)["iotistic_account_csrf"]
    assert "httponly" in csrf_cookie and "samesite=strict" in csrf_cookie
    signed = await sign_up(browser_client, "cookies@example.com")
    assert signed.status_code == 303, signed.text
    assert signed.headers["location"] == "/account"
    session = set_cookies(signed)["iotistic_account"]
    assert "httponly" in session and "samesite=lax" in session and "path=/" in session


async def test_the_license_download_is_the_customers_own_and_others_see_only_theirs(
    base_url: str, browser_client: httpx.AsyncClient
) -> None:
    assert (await sign_up(browser_client, "owner@example.com")).status_code == 303
    token = browser_client.cookies["iotistic_account"]
    me = (
        await browser_client.get("/api/customers/me", headers={"Authorization": f"Bearer {token}"})
    ).json()
    license_file = await eventually(
        lambda: browser_client.get("/account/license.jwt"),
        lambda r: r.status_code == 200,
        what="the license",
    )
    assert license_file.headers["content-disposition"].startswith("attachment;")
    claims = jwt.decode(license_file.text, options={"verify_signature": False})
    assert me["customer"]["customer_id"] in (claims.get("sub"), claims.get("customer_id"))

    async with httpx.AsyncClient(base_url=base_url, timeout=30) as other:
        assert (await sign_up(other, "other@example.com")).status_code == 303
        page = await other.get("/account")
        assert page.status_code == 200
        assert "other@example.com" in page.text and "owner@example.com" not in page.text
        theirs = await eventually(
            lambda: other.get("/account/license.jwt"), lambda r: r.status_code == 200
        )
        assert theirs.text != license_file.text
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as stranger:
        assert (await stranger.get("/account")).headers["location"].startswith("/login?next=")
        assert (await stranger.get("/account/license.jwt")).status_code == 303
        assert (await stranger.get("/account/progress")).status_code == 401


@pytest.mark.parametrize("path", ["/logout", "/login", "/signup", "/account/upgrade"])
async def test_a_form_without_the_right_token_or_from_another_site_is_refused(
    browser_client: httpx.AsyncClient, path: str
) -> None:
    token = await csrf_token(browser_client, "/login")
    fields = {"plan": "professional", "email": "x@example.com", "password": PASSWORD}
    assert (await browser_client.post(path, data=fields)).status_code == 403
    wrong = {**fields, "csrf_token": "0" * 64}
    assert (await browser_client.post(path, data=wrong)).status_code == 403
    foreign = await browser_client.post(
        path, data={**fields, "csrf_token": token}, headers={"Origin": "https://evil.example"}
    )
    assert foreign.status_code == 403
    # Another browser's token does not fit this browser's cookie.
    async with httpx.AsyncClient(base_url=str(browser_client.base_url)) as other:
        theirs = await csrf_token(other, "/login")
    assert theirs != token
    mixed = await browser_client.post(path, data={**fields, "csrf_token": theirs})
    assert mixed.status_code == 403


@pytest.mark.parametrize(
    "target",
    ["https://evil.example/", "//evil.example/x", "/\\evil.example", "javascript:alert(1)", ""],
)
async def test_sign_in_never_redirects_off_site(
    browser_client: httpx.AsyncClient, member: str, target: str
) -> None:
    page = await browser_client.get("/login", params={"next": target})
    assert 'name="next" value="/account"' in page.text
    token = TOKEN.search(page.text).group(1)  # type: ignore[union-attr]
    signed_in = await browser_client.post(
        "/login",
        data={
            "csrf_token": token,
            "email": member,
            "password": PASSWORD,
            "next": target,
        },
    )
    assert signed_in.status_code == 303
    assert signed_in.headers["location"] == "/account"


async def test_sign_in_goes_to_a_local_next_and_sign_out_ends_the_session(
    browser_client: httpx.AsyncClient, member: str
) -> None:
    assert (await sign_in(browser_client, member)).headers["location"] == "/account"
    token = await csrf_token(browser_client, "/account")
    out = await browser_client.post("/logout", data={"csrf_token": token})
    assert out.status_code == 303 and out.headers["location"] == "/login?notice=signed-out"
    assert "iotistic_account" not in browser_client.cookies
    token = await csrf_token(browser_client, "/login?next=/account/close")
    back = await browser_client.post(
        "/login",
        data={
            "csrf_token": token,
            "email": member,
            "password": PASSWORD,
            "next": "/account/close",
        },
    )
    assert back.headers["location"] == "/account/close"


async def test_a_wrong_password_gets_one_message_then_the_lockout_says_when(
    browser_client: httpx.AsyncClient,
) -> None:
    token = await csrf_token(browser_client, "/login")
    answers = []
    for _ in range(6):
        answers.append(
            await browser_client.post(
                "/login",
                data={"csrf_token": token, "email": "locked@example.com", "password": "nope nope"},
            )
        )
    assert [a.status_code for a in answers[:5]] == [401] * 5
    assert "That email and password do not match an account." in answers[0].text
    assert answers[5].status_code == 429
    assert re.search(r"try again in \d+ (seconds|minutes)", answers[5].text)


async def test_billing_forms_come_back_with_a_known_problem_only(
    browser_client: httpx.AsyncClient, member: str
) -> None:
    assert (await sign_in(browser_client, member)).status_code == 303
    token = await csrf_token(browser_client, "/account")
    bogus = await browser_client.post(
        "/account/upgrade", data={"csrf_token": token, "plan": "platinum"}
    )
    assert bogus.headers["location"] == "/account?problem=unknown_plan"
    page = await browser_client.get("/account", params={"problem": "unknown_plan"})
    assert "That plan does not exist" in page.text
    page = await browser_client.get("/account", params={"problem": "<script>x</script>"})
    assert "<script>x" not in page.text and "&lt;script&gt;" not in page.text
    portal = await browser_client.post("/account/billing", data={"csrf_token": token})
    assert portal.headers["location"] == "/account?problem=no_billing_account"
    signed_out = httpx.Cookies(
        {"iotistic_account_csrf": browser_client.cookies["iotistic_account_csrf"]}
    )
    async with httpx.AsyncClient(base_url=str(browser_client.base_url), cookies=signed_out) as anon:
        answer = await anon.post("/account/upgrade", data={"csrf_token": token, "plan": "starter"})
        assert answer.headers["location"] == "/account?problem=not_signed_in"


async def test_a_double_click_on_upgrade_gets_the_same_checkout_and_csp_allows_it(
    browser_client: httpx.AsyncClient, standin: StripeStandIn
) -> None:
    assert (await sign_up(browser_client, "double@example.com")).status_code == 303
    page = await eventually(
        lambda: browser_client.get("/account"), lambda r: "Upgrade to Enterprise" in r.text
    )
    assert f"form-action 'self' {standin.base_url}" in page.headers["content-security-policy"]
    token = TOKEN.search(page.text).group(1)  # type: ignore[union-attr]

    async def upgrade() -> httpx.Response:
        return await browser_client.post(
            "/account/upgrade", data={"csrf_token": token, "plan": "enterprise"}
        )

    first = await eventually(upgrade, lambda r: "/c/pay/" in r.headers.get("location", ""))
    second = await upgrade()
    assert first.status_code == second.status_code == 303
    assert first.headers["location"] == second.headers["location"]
    assert first.headers["location"].startswith(f"{standin.base_url}/c/pay/cs_test_")


async def test_the_progress_stream_ends_once_the_instance_is_ready(
    browser_client: httpx.AsyncClient, member: str
) -> None:
    assert (await sign_in(browser_client, member)).status_code == 303
    events: list[dict[str, Any]] = []
    async with browser_client.stream("GET", "/account/progress", timeout=120) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = ""
        async for line in stream.aiter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind == "progress":
                events.append(json.loads(line.split(":", 1)[1]))
            elif line.startswith("data:") and kind == "end":
                break
    assert events[-1]["status"] == "ready" and events[-1]["done"] is True
    assert events[-1]["instance_url"].startswith("http://127.0.0.1:")
    assert all(not e["done"] for e in events[:-1])


def test_the_templates_render_usage_invoices_and_the_verify_banner() -> None:
    """Until the account view carries them, the page reads them when present."""
    from datetime import UTC, datetime
    from types import SimpleNamespace

    from services.signup.pages import PAID_PLANS
    from services.signup.web import PAGES

    html = PAGES.html(
        "account.html",
        {
            "title": "Your account",
            "account": SimpleNamespace(
                customer=SimpleNamespace(
                    email="u@example.com", company_name="U", customer_id="c-1"
                ),
                subscription=SimpleNamespace(
                    plan="starter", status="trialing", trial_days_remaining=3
                ),
                license=SimpleNamespace(jwt=None),
            ),
            "progress": {
                "label": "Ready",
                "progress": 100,
                "tone": "ok",
                "message": "Your instance is up and running.",
                "error": None,
                "instance_url": "https://u.example",
                "done": True,
            },
            "usage": SimpleNamespace(
                day="2026-12-07",
                devices=3,
                messages=1200,
                api_requests=None,
                max_devices=10,
                messages_per_day=100_000,
                api_requests_per_day=None,
            ),
            "invoices": [
                SimpleNamespace(
                    number="INV-1",
                    status="paid",
                    amount=4900,
                    currency="eur",
                    created_at=datetime(2026, 12, 1, tzinfo=UTC),
                    url="javascript:alert(1)",
                )
            ],
            "email_verified": False,
            "plans": PAID_PLANS,
            "csrf_token": "t",
            "problem": None,
            "notice": None,
        },
    )
    assert "Devices: 3 of 10" in html and "Messages today: 1,200 of 100,000" in html
    assert "49.00 EUR" in html and "INV-1" in html and "javascript:" not in html
    assert "verify your email" in html
    assert "3 days left" in html


async def test_huge_forms_are_refused_before_they_are_read(
    browser_client: httpx.AsyncClient,
) -> None:
    token = await csrf_token(browser_client, "/signup")
    for path in ("/signup", "/login", "/account/upgrade"):
        answer = await browser_client.post(
            path, data={"csrf_token": token, "email": "x" * 1_000_000}
        )
        assert answer.status_code == 413, (path, answer.status_code)
        assert "Traceback" not in answer.text
    # A long field within the body limit is refused by its length, next to the field.
    answer = await browser_client.post(
        "/signup",
        data={
            "csrf_token": token,
            "email": "a@example.com",
            "company_name": "c" * 3000,
            "password": PASSWORD,
        },
    )
    assert answer.status_code == 400
    assert "Company must be at most 200 characters" in answer.text


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"email": "a@example.com"}'),
        ("application/x-www-form-urlencoded", b"email=%ff%fe&csrf_token=%00&password=\x80"),
        ("multipart/form-data; boundary=xyz", b"--xyz\r\nContent-Disposition: form-data\r\n\r\n"),
        ("multipart/form-data", b"garbage"),
        ("text/plain", b"\x00\x01\x02"),
    ],
)
@pytest.mark.parametrize("path", ["/signup", "/login", "/logout", "/account/upgrade"])
async def test_malformed_forms_get_a_4xx_never_a_trace(
    browser_client: httpx.AsyncClient, path: str, content_type: str, body: bytes
) -> None:
    await csrf_token(browser_client, "/login")
    answer = await browser_client.post(path, content=body, headers={"Content-Type": content_type})
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:300])
    assert "Traceback" not in answer.text


@pytest.mark.parametrize(
    ("status", "done", "link", "tone"),
    [
        ("queued", False, False, "warn"),
        ("deploying", False, False, "warn"),
        ("waiting_for_capacity", False, False, "warn"),
        ("ready", True, True, "ok"),
        ("degraded", True, True, "bad"),
        ("failed", True, False, "bad"),
    ],
)
def test_the_progress_shown_for_each_deployment_state(
    status: str, done: bool, link: bool, tone: str
) -> None:
    from services.signup.models import DeploymentOut
    from services.signup.progress import progress_of

    shown = progress_of(
        DeploymentOut(
            status=status,
            job_id="job",
            instance_url="https://acme.example" if status != "failed" else None,
            estimated_time=None,
            check_status_url="/api/customers/me",
            progress=40,
            step="database",
        )
    )
    assert shown["done"] is done and shown["tone"] == tone
    assert (shown["instance_url"] is not None) is link
    if not done:
        assert shown["message"] == "Current step: database"


def test_an_instance_link_must_be_http() -> None:
    from services.signup.progress import safe_link

    assert safe_link("javascript:alert(1)") is None
    assert safe_link("https://acme.example") == "https://acme.example"


async def test_one_customer_cannot_hold_more_than_a_few_progress_streams(
    base_url: str, settings: ServiceSettings
) -> None:
    """Each stream reads the database twice a second: a session may hold a few, not thousands;
    a closed stream frees its place."""
    customer_id = f"streams-{uuid.uuid4().hex[:8]}"  # no account yet: its deployment is pending
    async with asyncpg.create_pool(
        settings.database_url, min_size=1, max_size=2, server_settings={"search_path": "signup"}
    ) as pool:
        streams = [progress_events(pool, customer_id) for _ in range(STREAMS_PER_CUSTOMER)]
        for stream in streams:
            first = await anext(stream)
            assert first.event == "progress"
        assert not may_open_stream(customer_id)
        assert may_open_stream("someone-else")
        await streams[0].aclose()
        assert may_open_stream(customer_id)
        for stream in streams[1:]:
            await stream.aclose()


async def test_the_platforms_address_leads_to_sign_up_or_to_the_account(
    browser_client: httpx.AsyncClient, member: str
) -> None:
    first = await browser_client.get("/")
    assert (first.status_code, first.headers["location"]) == (303, "/signup")
    assert (await sign_in(browser_client, member)).status_code == 303
    again = await browser_client.get("/")
    assert (again.status_code, again.headers["location"]) == (303, "/account")
