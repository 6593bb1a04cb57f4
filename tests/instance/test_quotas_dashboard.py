"""Quotas in the instance's dashboard, in Debian's Chromium: the live meters with the burst
allowance, a banner when a limit is at 80% and then reached, and what the limit refused, each
shown without reloading the page. Checked with axe-core and at 390 px (``check_page``).
Everything real: the control plane, the instance, Postgres, NATS and Mosquitto.
"""

from __future__ import annotations

import pytest
from browser import check_page, new_page, open_browser
from dashboard_steps import open_section, sign_in
from test_instance import PASSWORD, client, customer, register  # noqa: F401 - client is a fixture

pytestmark = pytest.mark.slow


async def test_the_usage_section_shows_meters_notices_and_refusals_live(client) -> None:  # noqa: F811
    rosa = await customer(client, "rosa@example.com")
    base = str(rosa.api.base_url).rstrip("/")
    try:
        async with open_browser() as browser:
            page = await new_page(browser)
            await sign_in(page, base, "rosa@example.com", PASSWORD)
            await open_section(page, "usage")
            await page.wait_for_function(
                "() => /Burst allowance/.test(document.getElementById('quota-meters').innerText)"
                " && document.querySelector('#quota-limited tbody').rows.length > 0",
                timeout=20_000,
            )
            meters = await page.inner_text("#quota-meters")
            assert "Burst allowance" in meters and "8,333 of 8,333 readings" in meters
            assert "Nothing was refused" in await page.inner_text("#quota-limited")
            assert await page.is_hidden("#quota-banner")

            for index in range(8):
                await register(rosa, f"room {index}")
            # The page is not reloaded: the meters and the banner follow by themselves.
            await page.wait_for_function(
                "() => !document.getElementById('quota-banner').hidden",
                timeout=40_000,
            )
            banner = await page.inner_text("#quota-banner")
            assert "80% of a limit: 8 of 10 devices registered" in banner
            # The section's meters follow without a reload too.
            assert "8 of 10 (80%)" in await page.inner_text("#meters")

            for index in range(2):
                await register(rosa, f"hall {index}")
            refused = await rosa.api.post("/api/devices", json={"name": "one too many"})
            assert refused.status_code == 403
            await page.wait_for_function(
                "() => /device registration refused/.test("
                "document.getElementById('quota-limited').innerText)"
                " && /Limit reached/.test(document.getElementById('quota-banner').innerText)",
                timeout=40_000,
            )
            limited = await page.inner_text("#quota-limited")
            assert "1 device registration refused, the license allows 10 devices" in limited
            assert "Limit reached: 10 of 10 devices registered" in await page.inner_text(
                "#quota-notices"
            )
            await check_page(page, "instance-quotas")
    finally:
        await rosa.api.aclose()
