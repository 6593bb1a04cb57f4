"""The instance's dashboard as a facility manager uses it, in Debian's Chromium: signing in,
adding a device and publishing with the very ``mosquitto_pub`` command and Python snippet the
page shows, the firmware versions devices report, its charts, an alert rule made in the page
that fires (then muted), a dead letter from a bad payload, and the usage meters. Every section
is checked with axe-core and at 390 px, and screenshotted (``check_page``). Everything real:
the control plane, the instance, Postgres, NATS and Mosquitto.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import pytest
from browser import check_page, new_page, open_browser
from dashboard_steps import add_device_and_publish, open_section, run_snippet, until_text
from playwright.async_api import Page
from test_instance import PASSWORD, client, customer  # noqa: F401 - client is a fixture

from contracts import SubscriptionActivated
from support import eventually

pytestmark = pytest.mark.slow


async def sign_in(page: Page, base: str, email: str) -> None:
    await page.goto(base + "/")
    await page.wait_for_selector("#login-form", state="visible")
    await check_page(page, "instance-login")
    await page.fill("#email", email)
    await page.fill("#password", PASSWORD)
    await page.click("#login-form button[type=submit]")
    await page.wait_for_function("() => window.dashboardReady === true", timeout=20_000)


async def test_every_section_works_with_real_data_and_passes_axe(client, store) -> None:  # noqa: F811
    grace = await customer(client, "grace@example.com")
    # On the professional plan, for webhooks (its license arrives while the test goes on).
    await store.publish(
        SubscriptionActivated(
            customer_id=grace.id,
            plan="professional",
            status="active",
            stripe_customer_id="cus_grace",
            stripe_subscription_id="sub_grace",
        ),
        customer_id=grace.id,
    )
    base = str(grace.api.base_url).rstrip("/")
    requested: list[str] = []
    try:
        async with open_browser() as browser:
            page = await new_page(browser, permissions=["clipboard-read", "clipboard-write"])
            page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
            page.on("request", lambda r: requested.append(r.url))
            answer = await page.request.get(base + "/")
            policy = answer.headers["content-security-policy"]
            assert "script-src 'self';" in policy and "unsafe-eval" not in policy, policy
            await sign_in(page, base, "grace@example.com")

            command = await add_device_and_publish(page, "Lobby")
            status_topic = await page.text_content("#cred-5") or ""
            assert status_topic.endswith("/status"), status_topic
            office = await add_device_and_publish(page, "Office")
            # The page's Python snippet, run as is: its status reports firmware 1.0.0.
            python = await page.text_content("#snippet-python") or ""
            ran = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-c", python],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert ran.returncode == 0, ran.stderr
            await check_page(page, "instance-devices")

            await open_section(page, "charts")
            await page.wait_for_function(
                "() => { const c = document.getElementById('chart-temperature');"
                " return !!(c && c.data && c.data[0].y.length > 0); }",
                timeout=20_000,
            )
            # Both devices side by side: one trace each on every chart.
            await page.check("#chart-devices label:has-text('Office') input")
            await page.wait_for_function(
                "() => { const c = document.getElementById('chart-humidity');"
                " return c.data.length === 2 && c.data.every(t => t.y.length > 0); }",
                timeout=20_000,
            )
            await page.wait_for_selector("#chart-iaq .shapelayer path")  # the IAQ bands
            raw = await page.get_attribute("#csv-raw a", "href")
            assert raw and "/readings.csv?from=" in raw, raw
            async with page.expect_download() as download:
                await page.click("#csv-shown")
            saved = Path(await (await download.value).path())
            shown = await asyncio.to_thread(saved.read_text)
            assert shown.startswith("device,metric,time,value\n"), shown
            assert "Lobby,temperature," in shown and shown.rstrip().endswith(",0.8"), shown
            await check_page(page, "instance-charts")
            # The bucket fits the range: a week in hours, a month in days, a custom range.
            for value, bucket in (("7d", "1 hour"), ("30d", "1 day")):
                await page.select_option("#range", value)
                await page.wait_for_selector(f"#chart-note >> text=average over {bucket}")
            await page.select_option("#range", "custom")
            await page.fill("#from", "2026-01-01T00:00")
            await page.fill("#to", "2026-01-01T02:00")
            await page.click("#custom-range button[type=submit]")
            await page.wait_for_selector("#chart-note >> text=average over 1 minute.")
            assert "2026-01-01" in (await page.get_attribute("#csv-raw a", "href") or "")

            await open_section(page, "alerts")
            await page.fill("#rule-name", "Lobby too warm")
            await page.select_option("#rule-metric", "temperature")
            await page.select_option("#rule-operator", ">")
            await page.fill("#rule-threshold", "20")
            await page.fill("#rule-for", "0")
            await page.click("#rule-submit")
            await page.wait_for_selector("#rules >> text=Lobby too warm")
            await until_text(page, "alerts", "#history", "still firing")
            await check_page(page, "instance-alerts")
            # The Lobby's rule, not one of the indoor-air rules every instance has.
            lobby_rule = "#rules tr:has-text('Lobby too warm')"
            await page.click(f"{lobby_rule} button:has-text('Mute')")
            await page.wait_for_selector(f"{lobby_rule} button:has-text('Unmute')")
            assert "muted" in await page.inner_text(lobby_rule)
            await eventually(
                lambda: grace.api.get("/api/license"),
                lambda r: r.json().get("plan") == "professional",
                timeout=60,
                what="the professional license",
            )
            await page.fill("#rule-name", "Stuffy air")
            await page.select_option("#rule-metric", "iaq")
            await page.fill("#rule-threshold", "150")
            await page.fill("#rule-webhook", "http://127.0.0.1:9/hook")
            await page.click("#rule-submit")
            await page.wait_for_selector("#rule-secret", state="visible")
            secret = await page.inner_text("#rule-secret-value")
            assert len(secret) > 30
            listed = (await grace.api.get("/api/alerts/rules")).json()
            assert secret not in str(listed)  # shown once, never listed
            await page.click("#rule-secret-done")
            assert await page.inner_text("#rule-secret-value") == ""
            await page.click("#rules tr:has-text('Lobby too warm') button:has-text('Edit')")
            await page.fill("#rule-threshold", "25.5")
            await page.click("#rule-submit")
            await page.wait_for_selector("#rules >> text=temperature > 25.5 for 0 s")
            assert await page.inner_text("#rule-submit") == "Create rule"

            bad = re.sub(r'\\"temperature\\":21.5', r'\\"temperature\\":\\"warm\\"', command)
            assert bad != command
            run_snippet(bad)
            misspelt = command.replace('\\"temperature\\":', '\\"temp\\":')
            assert misspelt != command
            run_snippet(misspelt)
            await until_text(page, "problems", "#dead-letters", "must be a number")
            await until_text(page, "problems", "#dead-letters", '"temp", which is not a field')
            await check_page(page, "instance-problems")

            await open_section(page, "usage")
            await page.wait_for_selector("#meters progress")
            assert "Messages today" in await page.inner_text("#meters")
            assert "At 100%" in await page.inner_text("#meters")
            await check_page(page, "instance-usage")

            # The Lobby reports its firmware in a JSON status, on the status topic of its
            # credentials.
            payload = '{"state":"online","firmware":"1.4.2"}'
            run_snippet(f"{command.split(' -t ')[0]} -t '{status_topic}' -m '{payload}'")
            await until_text(page, "devices", "#devices tr:has-text('Lobby')", "firmware 1.4.2")
            assert "firmware 1.0.0" in await page.inner_text("#devices tr:has-text('Office')")
            lobby_id = await page.get_attribute("#devices tr:has-text('Lobby')", "data-device")
            lobby = f"#devices tr[data-device='{lobby_id}']"
            await page.click(f"{lobby} button:has-text('Rename')")
            await page.fill(f"{lobby} input", "Front lobby")
            await page.click(f"{lobby} button:has-text('Save')")
            await page.wait_for_selector("#devices >> text=Front lobby")
            await page.click("#devices tr:has-text('Office') button:has-text('Delete')")
            await page.wait_for_selector("#notice >> text=Office deleted")
            # The notice comes before the list is fetched again.
            await page.wait_for_selector("#devices tr:has-text('Office')", state="detached")
            assert "Office" not in await page.inner_text("#devices")
            with pytest.raises(AssertionError):  # its credentials stopped working at once
                run_snippet(office)
        assert requested and all(url.startswith(base) for url in requested), requested
    finally:
        await grace.api.aclose()
