"""Integrations in the instance's dashboard, in Debian's Chromium: an integration added in
the Alerts section with its secret shown once, a backfill of the past day started in the page
and followed to done, every reading of it received (signed) by a real receiver, and a receiver
that stops answering shown as failing. Checked with axe-core and at 390 px (``check_page``).
Everything real: the control plane, the instance, Postgres, NATS and Mosquitto."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from browser import check_page, new_page, open_browser
from dashboard_steps import open_section, sign_in, until_text
from integration_steps import receiving
from test_instance import (  # noqa: F401 - client is a fixture
    PASSWORD,
    client,
    customer,
    device_client,
    reading,
    register,
)
from test_integrations_api import upgrade

pytestmark = pytest.mark.slow


async def test_an_integration_is_added_and_backfilled_in_the_page(
    client,  # noqa: F811
    store,
    broker,
) -> None:
    rosa = await customer(client, "rosa@example.com")
    base = str(rosa.api.base_url).rstrip("/")
    try:
        await upgrade(rosa, store)
        device = await register(rosa, "studio")
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
        async with device_client(broker, device) as mqtt:
            for i in range(30):
                ts = (start + timedelta(minutes=i)).isoformat()
                await mqtt.publish(device["mqtt"]["topics"]["readings"], reading(ts=ts), qos=1)
        async with receiving() as receiver, open_browser() as browser:
            page = await new_page(browser, permissions=["clipboard-read", "clipboard-write"])
            page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
            await sign_in(page, base, "rosa@example.com", PASSWORD)
            await open_section(page, "alerts")
            await page.fill("#integration-name", "Data lake")
            await page.fill("#integration-url", receiver.url)
            await page.check("#integration-kinds input[value=alert]")
            await page.click("#integration-form button[type=submit]")
            await page.wait_for_selector("#integration-secret", state="visible")
            receiver.secret = await page.inner_text("#integration-secret-value")
            await page.click("#integration-secret-done")
            await page.wait_for_selector("#integration-secret", state="hidden")
            await until_text(page, "alerts", "#integrations-table", "Data lake")
            await page.click("#integrations-table button:has-text('Backfill')")
            await page.wait_for_selector("#backfill-form", state="visible")
            await page.click("#backfill-form button[type=submit]")
            await until_text(page, "alerts", "#integrations-table", "30 of 30")
            # The last page delivered, the backfill is marked done a moment later.
            await until_text(page, "alerts", "#integrations-table", "done")
            table = await page.inner_text("#integrations-table")
            await check_page(page, "instance-integrations")
            # The receiver stops answering: the page says so, and why.
            receiver.refuse = 10_000
            async with device_client(broker, device) as mqtt:
                await mqtt.publish(device["mqtt"]["topics"]["readings"], reading(), qos=1)
            await until_text(page, "alerts", "#integrations-table", "failing")
            failing = await page.inner_text("#integrations-table")
            listed = (await rosa.api.get("/api/integrations")).json()["integrations"]
    finally:
        await rosa.api.aclose()
    assert receiver.bad_signatures == 0
    assert "done" in table
    assert "readings as they are stored, alert firings" in table
    sent = receiver.readings(backfill=receiver.posts[0].get("backfill_id"))
    assert sorted(ts for _, ts in sent) == [
        (start + timedelta(minutes=i)).isoformat() for i in range(30)
    ]
    assert "answered 500" in failing
    assert listed[0]["delivery"]["state"] == "failing"
