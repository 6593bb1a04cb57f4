"""A BME688's calibration in the instance's dashboard, in Debian's Chromium: a badge per device
("calibrating: 2 h so far, usually 4 days for a new sensor"; minutes for a known sensor after a
power cut), the history panel opened from it, the readings taken before calibration shaded in
the charts, and the badge following a live reading that reaches accuracy 3. Checked with
axe-core and at 390 px, and screenshotted (``check_page``). Everything real: the control plane,
the instance, Postgres, NATS and Mosquitto.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from browser import accessibility_problems, check_page, new_page, open_browser
from dashboard_steps import open_section, sign_in
from test_instance import (  # noqa: F401 - client is a fixture
    PASSWORD,
    client,
    customer,
    device_client,
    reading,
    register,
)

from libs.servers.mosquitto import EmbeddedMosquitto
from support import eventually

pytestmark = pytest.mark.slow


async def publish(
    broker: EmbeddedMosquitto, device: dict[str, Any], sent: list[tuple[datetime, int]]
) -> None:
    async with device_client(broker, device) as mqtt:
        for at, accuracy in sent:
            body = reading(ts=at.isoformat(), iaq_accuracy=accuracy)
            await mqtt.publish(device["mqtt"]["topics"]["readings"], body, qos=1)


def badge(device_id: str) -> str:
    return f"#devices tr[data-device='{device_id}'] .calibration-badge"


async def test_calibration_badges_history_and_shaded_charts(client, broker) -> None:  # noqa: F811
    mia = await customer(client, "mia@example.com")
    base = str(mia.api.base_url).rstrip("/")
    now = datetime.now(UTC).replace(microsecond=0)
    lab, office = await register(mia, "Lab sensor"), await register(mia, "Office")
    ago = [now - timedelta(minutes=m) for m in (125, 124, 60, 30, 2)]
    await publish(broker, lab, list(zip(ago, (0, 0, 1, 2, 2), strict=True)))
    # The office sensor was calibrated, then lost power ten minutes ago.
    cut = [now - timedelta(minutes=m) for m in (180, 150, 10, 5)]
    await publish(broker, office, list(zip(cut, (1, 3, 0, 1), strict=True)))
    await eventually(
        lambda: mia.api.get("/api/devices"),
        lambda r: all(
            d["calibration"]["iaq_accuracy"] in (1, 2) and d["latest"] for d in r.json()["devices"]
        ),
        what="both devices' readings",
    )
    try:
        async with open_browser() as browser:
            page = await new_page(browser)
            await sign_in(page, base, "mia@example.com", PASSWORD)
            lab_badge = badge(lab["device_id"])
            await page.wait_for_selector(lab_badge)
            assert await page.inner_text(lab_badge) == (
                "calibrating: 2 h so far, usually 4 days for a new sensor"
            )
            office_badge = await page.inner_text(badge(office["device_id"]))
            assert office_badge == (
                "calibrating: 10 min so far, usually 5 to 30 min after a power cycle of a "
                "sensor calibrated before"
            ), office_badge

            # The charts shade the Lab's readings taken before calibration.
            await open_section(page, "charts")
            await page.wait_for_function(
                "() => { const c = document.getElementById('chart-temperature');"
                " return !!(c && c.layout && (c.layout.shapes || [])"
                ".some(s => s.name === 'calibrating')); }",
                timeout=20_000,
            )
            note = await page.inner_text("#calibration-chart-note")
            assert "taken before the sensor was calibrated" in note and "Lab sensor" in note
            assert await accessibility_problems(page) == []

            # The office's history: its first run, the drop to 0, and the run going on now.
            await open_section(page, "devices")
            await page.click(badge(office["device_id"]))
            await page.wait_for_selector("#calibration-changes >> text=drop to 0")
            assert await page.evaluate("document.activeElement.id") == "calibration"
            assert await page.inner_text("#calibration-name") == "Office"
            runs = await page.inner_text("#calibration-runs tbody")
            assert "current run" in runs and "30 min" in runs, runs  # 1 -> 3 took 30 min
            facts = await page.inner_text("#calibration-facts")
            assert "Drops to 0\t1" in facts or "Drops to 0\n1" in facts, facts
            assert "power cycle" in facts
            await check_page(page, "instance-calibration")
            await page.click("#calibration-close")
            assert await page.is_hidden("#calibration")

            # Live: the Lab reaches accuracy 3 and its badge follows.
            await publish(broker, lab, [(datetime.now(UTC), 3)])
            await page.wait_for_selector(f"{lab_badge}.calibrated", timeout=20_000)
            assert await page.inner_text(lab_badge) == "calibrated"
    finally:
        await mia.api.aclose()
