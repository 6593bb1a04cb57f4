"""The pages of forgotten passwords, email verification and closing an account, in Chromium:
the whole reset through the mail ``iotistic mail tail`` shows, the verification link, closing
with the password, and forms refused without their CSRF token."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from browser import check_page, new_page, open_browser
from playwright.async_api import Browser, Page
from test_recovery import (
    NEW_PASSWORD,
    PASSWORD,
    events_of,
    log_in,
    mail_tail,
    new_email,
    sign_up,
)

from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.runtime.platform import Platform
from libs.servers.ports import free_port
from libs.web.forms import SESSION_COOKIE
from services.billing.app import BILLING
from services.licensing.app import LICENSING
from services.signup.app import SIGNUP
from services.targets import build_app
from support import SUITE_SIGNUP_LIMITS, eventually, license_keys_dir, serving

PORT = free_port()
BASE = f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
async def platform(settings: ServiceSettings, store: EventStore) -> Platform:
    return Platform.from_settings(
        settings,
        [SIGNUP, LICENSING, BILLING],
        license_keys_dir=license_keys_dir(),
        argon2_memory_kib=8192,
        argon2_time_cost=1,
        public_url=BASE,
        **SUITE_SIGNUP_LIMITS,
    )


@pytest.fixture(scope="module")
async def client(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(build_app(platform, "all"), PORT) as http:
        await platform.wait_started()
        yield http


@pytest.fixture(scope="module")
async def browser(client: httpx.AsyncClient) -> AsyncIterator[Browser]:
    async with open_browser() as chromium:
        yield chromium


async def signed_in_page(browser: Browser, token: str) -> Page:
    """A page whose browser carries the session cookie of ``token``."""
    page = await new_page(browser)
    await page.context.add_cookies(
        [{"name": SESSION_COOKIE, "value": token, "url": BASE, "httpOnly": True, "sameSite": "Lax"}]
    )
    return page


def link_in(printed: str, path: str, email: str) -> str:
    """The last ``path`` link of the mails to ``email`` that ``iotistic mail tail`` printed."""
    mails = [m for m in printed.split("--- mail ") if f"To: {email}" in m]
    links = [
        link for m in mails for link in re.findall(re.escape(BASE + path) + r"\?token=[\w-]+", m)
    ]
    assert links, printed
    return links[-1]


async def printed_link(settings: ServiceSettings, path: str, email: str) -> str:
    async def probe() -> str:
        return mail_tail(settings, "-n", "100")

    printed = await eventually(
        probe, lambda out: f"To: {email}" in out and BASE + path in out, what="the mail"
    )
    return link_in(printed, path, email)


async def test_a_forgotten_password_is_reset_through_the_mailed_link(
    client, browser, settings
) -> None:
    email = new_email()
    await sign_up(client, email)
    old = await signed_in_page(browser, (await log_in(client, email, PASSWORD)).json()["token"])
    await old.goto(f"{BASE}/account/close")
    assert await old.get_by_role("heading", name="Close your account").is_visible()

    page = await new_page(browser)
    await page.goto(f"{BASE}/forgot")
    await check_page(page, "forgot")
    await page.get_by_label("Email", exact=True).fill(email)
    await page.get_by_role("button", name="Mail me a link").click()
    await page.get_by_role("status").wait_for()
    assert "on its way" in await page.get_by_role("status").inner_text()
    await check_page(page, "forgot-sent")

    link = await printed_link(settings, "/reset", email)
    await page.goto(link)
    await check_page(page, "reset")
    await page.get_by_label("New password", exact=True).fill("password1")
    await page.get_by_role("button", name="Set the new password").click()
    error = page.locator("#f-password-error")
    await error.wait_for()
    assert "too common" in await error.inner_text()
    await check_page(page, "reset-refused")
    await page.get_by_label("New password", exact=True).fill(NEW_PASSWORD)
    await page.get_by_role("button", name="Set the new password").click()
    await page.wait_for_url(f"{BASE}/account")
    cookies = {c["name"]: c for c in await page.context.cookies(BASE)}
    assert cookies[SESSION_COOKIE]["httpOnly"] and cookies[SESSION_COOKIE]["sameSite"] == "Lax"
    # Signed in: the signed-in pages open, where the old browser is sent to sign in.
    await page.goto(f"{BASE}/account/close")
    assert await page.get_by_role("heading", name="Close your account").is_visible()
    await old.goto(f"{BASE}/account/close")
    assert unquote(old.url).startswith(f"{BASE}/login?next=/account/close")
    assert (await log_in(client, email, PASSWORD)).status_code == 401
    assert (await log_in(client, email, NEW_PASSWORD)).status_code == 200
    # The link is spent.
    await page.goto(link)
    await page.get_by_label("New password", exact=True).fill("another long phrase")
    await page.get_by_role("button", name="Set the new password").click()
    await page.get_by_role("alert").wait_for()
    assert "ask for a new one" in await page.get_by_role("alert").inner_text()


async def test_the_verification_link_opens_a_page_that_says_so(client, browser, settings) -> None:
    email = new_email()
    await sign_up(client, email)
    link = await printed_link(settings, "/verify", email)
    page = await new_page(browser)
    await page.goto(link)
    assert "is verified" in await page.get_by_role("status").inner_text()
    await check_page(page, "verify")
    await page.goto(f"{BASE}/verify?token=forged-token-that-was-never-mailed")
    assert "not valid" in await page.get_by_role("status").inner_text()
    await check_page(page, "verify-invalid")


async def test_closing_in_the_browser_needs_the_password_and_signs_out(
    client, browser, store
) -> None:
    email = new_email()
    customer_id = await sign_up(client, email)
    page = await signed_in_page(browser, (await log_in(client, email, PASSWORD)).json()["token"])
    page.on("dialog", lambda dialog: dialog.accept())
    await page.goto(f"{BASE}/account/close")
    body = await page.locator("main").inner_text()
    assert "stopped" in body and "grace period" in body and "ends" in body
    await check_page(page, "close")
    await page.get_by_label("Your password", exact=True).fill("not my password at all")
    await page.get_by_role("button", name="Close my account").click()
    error = page.locator("#f-password-error")
    await error.wait_for()
    assert "is not your current password" in await error.inner_text()
    await page.get_by_label("Your password", exact=True).fill(PASSWORD)
    await page.get_by_label("Erase my data now").check()
    await page.get_by_role("button", name="Close my account").click()
    await page.get_by_role("status").wait_for()
    assert "erased" in await page.get_by_role("status").inner_text()
    await check_page(page, "close-done")
    assert SESSION_COOKIE not in {c["name"] for c in await page.context.cookies(BASE)}
    # Closed with erasure: the email names no account any more (not even a closed one).
    refused = await log_in(client, email, PASSWORD)
    assert refused.status_code == 401
    events = await eventually(
        lambda: events_of(store, "CustomerClosed", customer_id), what="CustomerClosed"
    )
    assert len(events) == 1


async def test_signed_out_the_close_page_sends_to_sign_in(client) -> None:
    answer = await client.get("/account/close")
    assert answer.status_code == 303
    assert unquote(answer.headers["location"]) == "/login?next=/account/close"


async def csrf_of(client: httpx.AsyncClient, path: str) -> str:
    page = await client.get(path)
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert match
    return match.group(1)


@pytest.mark.parametrize("path", ["/forgot", "/reset", "/account/close"])
async def test_forms_without_their_csrf_token_are_refused(client, path) -> None:
    async with httpx.AsyncClient(base_url=BASE) as fresh:
        token = await csrf_of(fresh, "/forgot")
        fields: dict[str, Any] = {"email": "a@example.com", "token": "x" * 43, "password": "p"}
        missing = await fresh.post(path, data=fields)
        assert missing.status_code == 403
        wrong = await fresh.post(path, data={**fields, "csrf_token": "0" * 64})
        assert wrong.status_code == 403
        elsewhere = await fresh.post(
            path, data={**fields, "csrf_token": token}, headers={"Origin": "https://evil.example"}
        )
        assert elsewhere.status_code == 403
        right = await fresh.post(path, data={**fields, "csrf_token": token})
        assert right.status_code != 403
