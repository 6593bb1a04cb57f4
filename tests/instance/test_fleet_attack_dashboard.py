"""A fleet device names itself (``deviceName`` at registration): whoever holds a provisioning
key (a stranger who read it off a device) chooses what the customer's dashboard shows. The
chart library (plotly) reads a trace's name as its own small HTML (links, styles); a device's
name must show as the text it is, in the page and in the charts. In Debian's Chromium, against
the real control plane, instance, Postgres, NATS and Mosquitto."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from browser import new_page, open_browser
from dashboard_steps import open_section, sign_in
from fleet_steps import create_key, new_api_key, new_uuid, post_registration, registration_body
from test_fleet_dashboard import device_client
from test_instance import PASSWORD, client, customer  # noqa: F401 - client is a fixture

pytestmark = pytest.mark.slow

NAME = '<a href="https://evil.example/">sign in again</a><b>!</b>'


async def test_a_device_name_is_text_in_the_charts(client) -> None:  # noqa: F811
    dora = await customer(client, "dora@example.com")
    key = (await create_key(dora))["key"]
    base = str(dora.api.base_url).rstrip("/")
    for name in (NAME, "Plain"):
        uuid = new_uuid()
        answer = await post_registration(base, key, registration_body(uuid, new_api_key(), name))
        assert answer.status_code == 200, answer.text
        at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
        reading = {"temperature": 21.5, "humidity": 45, "pressure": 101325, "gas_resistance": 1e5}
        async with device_client(answer.json()["mqtt"]) as mqtt:
            await mqtt.publish(
                f"iot/device/{uuid}/sensor/bme688",
                json.dumps({"timestamp": at, "messages": [reading]}),
                qos=1,
            )
    async with open_browser() as browser:
        page = await new_page(browser)
        await sign_in(page, base, "dora@example.com", PASSWORD)
        await open_section(page, "charts")
        for label in ("Plain", "sign in again"):
            box = page.locator(f"#chart-devices label:has-text('{label}') input")
            if not await box.is_checked():
                await box.check()
        await page.wait_for_function(
            "() => { const c = document.getElementById('chart-temperature');"
            " return !!(c && c.data && c.data.length === 2 && c.data.every(t => t.y.length)); }",
            timeout=20_000,
        )
        await page.wait_for_selector("#chart-temperature .legendtext")
        legend = await page.locator("#chart-temperature .legendtext").all_text_contents()
        assert NAME in legend, legend
        assert await page.locator("#chart-temperature a").count() == 0
        assert await page.locator("a[href*='evil.example']").count() == 0
    await dora.api.aclose()
