"""The whole journey of a new customer, in one Chromium session, as issue 16 tells it: sign up
in the browser, watch the instance come up, add a device, publish with the command the page
shows (Debian's ``mosquitto_pub``), see the reading on the chart, make an alert rule and see it
fire, upgrade through Checkout, see the plan change on the account page; then forget the
password and reset it through the mail ``iotistic mail tail`` shows.

Everything is real (the control plane with the local provisioning backend, the customer's
instance process, Postgres, NATS, Mosquitto) but Stripe, which is the labelled STAND-IN of
``tests/stripe_standin.py``, serving its own Checkout page.
"""

from __future__ import annotations

import asyncio
import re

import pytest
from browser import check_page, new_page, open_browser
from dashboard_steps import add_device_and_publish, open_section, run_snippet, until_text
from playwright.async_api import Page
from test_account_pages import base_url, standin  # noqa: F401 - fixtures
from test_recovery import mail_tail

from libs.config import ServiceSettings
from stripe_standin import StripeStandIn
from support import eventually

pytestmark = pytest.mark.slow

EMAIL = "journey@example.com"
PASSWORD = "Quiet Harbour 42 lanterns"
NEW_PASSWORD = "Seven Copper Kettles on the hill"


async def sign_up_and_wait_for_the_instance(page: Page) -> str:
    """Sign up from the platform's address and follow the progress to the instance's link."""
    await page.goto("/")
    await page.wait_for_url(re.compile(r"/signup$"))
    await page.fill("#f-email", EMAIL)
    await page.fill("#f-company_name", "Journey Air")
    await page.fill("#f-password", PASSWORD)
    await page.click("main button[type=submit]")
    await page.wait_for_url(re.compile(r"/account$"))
    link = page.locator('a[data-field="instance"]')
    await link.wait_for(state="visible", timeout=90_000)  # moved by the progress stream
    assert await page.inner_text('[data-field="label"]') == "Ready"
    instance_url = await link.get_attribute("href")
    assert instance_url and instance_url.startswith("http://127.0.0.1:")
    return instance_url.rstrip("/")


async def device_reading_and_alert(page: Page, instance_url: str) -> None:
    """On the instance: sign in, add a device, publish with its snippet, chart, alert."""
    await page.goto(instance_url + "/")
    await page.fill("#email", EMAIL)
    await page.fill("#password", PASSWORD)
    await page.click("#login-form button[type=submit]")
    await page.wait_for_function("() => window.dashboardReady === true", timeout=20_000)
    command = await add_device_and_publish(page, "Meeting room")

    await open_section(page, "charts")
    await page.wait_for_function(
        "() => { const c = document.getElementById('chart-temperature');"
        " return !!(c && c.data && c.data.some(t => t.y.includes(21.5))); }",
        timeout=20_000,
    )

    await open_section(page, "alerts")
    await page.fill("#rule-name", "Meeting room too warm")
    await page.select_option("#rule-metric", "temperature")
    await page.select_option("#rule-operator", ">")
    await page.fill("#rule-threshold", "20")
    await page.fill("#rule-for", "0")
    await page.click("#rule-submit")
    await page.wait_for_selector("#rules >> text=Meeting room too warm")
    run_snippet(command)  # a reading after the rule exists
    await until_text(page, "alerts", "#history", "still firing")
    assert "Meeting room too warm" in await page.inner_text("#history")


async def upgrade(page: Page, base: str) -> None:
    """Upgrade on the account page through the stand-in's Checkout; the plan follows."""
    await page.goto(base + "/account")
    await page.click("text=Upgrade to Professional")
    await page.wait_for_url(re.compile(r"/c/pay/cs_test_"))
    assert "STAND-IN for Stripe" in await page.inner_text("body")
    await page.click("text=Pay")
    await page.wait_for_url(re.compile(r"/account\?checkout=success"))

    async def plan_shown() -> str:
        await page.goto(base + "/account")
        return await page.inner_text('[data-field="plan"]')

    await eventually(plan_shown, lambda plan: plan == "Professional", what="the new plan")
    await check_page(page, "journey-account-upgraded")


async def reset_through_the_mail(page: Page, base: str, settings: ServiceSettings) -> None:
    """Sign out, ask for a reset link, read it in ``iotistic mail tail``, set a new password."""
    await page.click("text=Sign out")
    await page.wait_for_url(re.compile(r"/login"))
    await page.click("text=Forgot your password?")
    await page.wait_for_url(re.compile(r"/forgot$"))
    await page.get_by_label("Email", exact=True).fill(EMAIL)
    await page.get_by_role("button", name="Mail me a link").click()
    await page.get_by_role("status").wait_for()

    def reset_links(printed: str) -> list[str]:
        mails = [m for m in printed.split("--- mail ") if f"To: {EMAIL}" in m]
        return [t for m in mails for t in re.findall(r"/reset\?token=[\w-]+", m)]

    printed = await eventually(
        lambda: asyncio.to_thread(mail_tail, settings, "-n", "50"),
        lambda out: bool(reset_links(out)),
        what="the reset mail in iotistic mail tail",
    )
    await page.goto(base + reset_links(printed)[-1])
    await page.get_by_label("New password", exact=True).fill(NEW_PASSWORD)
    await page.get_by_role("button", name="Set the new password").click()
    await page.wait_for_url(re.compile(r"/account$"))
    assert EMAIL in await page.inner_text("main")


async def test_a_new_customer_walks_the_whole_journey_in_the_browser(
    base_url: str,  # noqa: F811
    standin: StripeStandIn,  # noqa: F811
    settings: ServiceSettings,
) -> None:
    async with open_browser() as browser:
        page = await new_page(
            browser, base_url=base_url, permissions=["clipboard-read", "clipboard-write"]
        )
        page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        instance_url = await sign_up_and_wait_for_the_instance(page)
        await device_reading_and_alert(page, instance_url)
        await upgrade(page, base_url)
        reached = [kind for kind, status in standin.webhooks_sent if status == 200]
        assert "checkout.session.completed" in reached
        await reset_through_the_mail(page, base_url, settings)
        # Signed in again with the new password only.
        await page.click("text=Sign out")
        await page.wait_for_url(re.compile(r"/login"))
        await page.fill("#f-email", EMAIL)
        await page.fill("#f-password", PASSWORD)
        await page.click("main button[type=submit]")
        await page.wait_for_selector(".problem")
        await page.fill("#f-password", NEW_PASSWORD)
        await page.click("main button[type=submit]")
        await page.wait_for_url(re.compile(r"/account$"))
