"""Indoor-air alerts on a new customer's instance, in the API and in Debian's Chromium: the four
rules every instance has from the start, a CO₂ alert fired by a device's readings and explained
("why did this fire"), a rule tuned (PUT), checked field by field and kept from other customers,
a rule tuned, muted and deleted in the page and added back. The page is checked with axe-core
and at 390 px, and screenshotted (``check_page``). Everything real: the control plane, the
instance, Postgres, NATS and Mosquitto.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from browser import check_page, new_page, open_browser
from dashboard_steps import open_section, sign_in
from test_instance import (  # noqa: F401 - client is a fixture
    PASSWORD,
    Customer,
    client,
    customer,
    device_client,
    reading,
    register,
)

from support import eventually

pytestmark = pytest.mark.slow


async def rules(c: Customer) -> list[dict[str, Any]]:
    answer = await c.api.get("/api/alerts/rules")
    assert answer.status_code == 200, answer.text
    return list(answer.json()["rules"])


async def stuffy_office(c: Customer, broker: Any) -> dict[str, Any]:
    """A device whose last 40 minutes of readings (calibrated) were at 1,500 ppm."""
    device = await register(c, "Office")
    start = datetime.now(UTC) - timedelta(minutes=40)
    async with device_client(broker, device) as mqtt:
        for minute in range(41):
            ts = (start + timedelta(minutes=minute)).isoformat()
            body = reading(ts=ts, co2_equivalent=1500.0, humidity=45.0 + minute % 5)
            await mqtt.publish(device["mqtt"]["topics"]["readings"], body, qos=1)
    return device


async def test_indoor_air_rules_are_on_by_default_and_tuned_in_the_api(
    client,  # noqa: F811
    broker,
) -> None:
    jane = await customer(client, "jane@example.com")
    kim = await customer(client, "kim@example.com")
    try:
        found = await eventually(
            lambda: rules(jane), lambda r: len(r) == 4, what="the preset rules"
        )
        assert {r["kind"]: r["preset"] for r in found} == {
            "offline": "offline",
            "mould_risk": "mould_risk",
            "stale_sensor": "stale_sensor",
            "co2_high": "co2_high",
        }
        co2 = next(r for r in found if r["kind"] == "co2_high")
        assert co2["params"] == {"ppm_above": 1000, "minutes": 30}
        assert co2["condition"] == "CO₂-equivalent above 1000 ppm for 30 min"
        assert co2["include_calibrating"] is False and co2["muted"] is False
        path = f"/api/alerts/rules/{co2['rule_id']}"

        device = await stuffy_office(jane, broker)
        history = await eventually(
            lambda: jane.api.get("/api/alerts/history"),
            lambda r: any(h["rule_id"] == co2["rule_id"] for h in r.json()["history"]),
            timeout=30,
            what="the CO2 alert firing",
        )
        fired = next(h for h in history.json()["history"] if h["rule_id"] == co2["rule_id"])
        assert fired["device_id"] == device["device_id"] and fired["event"] == "firing"
        assert fired["explanation"].startswith("CO₂-equivalent 1500 to 1500 ppm for 30 min")
        assert fired["evidence"]["part"] == "co2" and fired["evidence"]["readings"] >= 30

        for body, field in (
            ({"params": {"minutes": 0}}, "params.minutes"),
            ({"params": {"ppm_above": "lots"}}, "params.ppm_above"),
            ({"params": {"ppm": 900}}, "params.ppm"),
            ({"params": "900"}, "params"),
            ({"kind": "offline"}, "kind"),
            ({"threshold": 900}, "threshold"),
            ({"include_calibrating": 1}, "include_calibrating"),
        ):
            refused = await jane.api.put(path, json=body)
            assert refused.status_code == 400, (body, refused.text)
            assert field in [f["field"] for f in refused.json()["error"]["fields"]], refused.text
        tuned = await jane.api.put(path, json={"params": {"ppm_above": 1200}})
        assert tuned.status_code == 200, tuned.text
        assert tuned.json()["params"] == {"ppm_above": 1200, "minutes": 30}
        assert tuned.json()["condition"] == "CO₂-equivalent above 1200 ppm for 30 min"
        # Another customer's session finds no such rule, to tune or to delete.
        async with httpx.AsyncClient(base_url=str(jane.api.base_url), headers=kim.auth) as other:
            assert (await other.put(path, json={"muted": True})).status_code == 404
            assert (await other.delete(path)).status_code == 404
        assert len(await rules(kim)) == 4  # and theirs are their own
        assert (await jane.api.delete(path)).status_code == 204
        assert "co2_high" not in [r["kind"] for r in await rules(jane)]
        again = await jane.api.post("/api/alerts/rules", json={"kind": "co2_high"})
        assert again.status_code == 201, again.text
        assert again.json()["preset"] is None and again.json()["params"]["ppm_above"] == 1000
    finally:
        await jane.api.aclose()
        await kim.api.aclose()


async def test_indoor_air_alerts_are_explained_and_tuned_in_the_page(
    client,  # noqa: F811
    broker,
) -> None:
    lena = await customer(client, "lena@example.com")
    base = str(lena.api.base_url).rstrip("/")
    try:
        await stuffy_office(lena, broker)
        async with open_browser() as browser:
            page = await new_page(browser)
            page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
            await sign_in(page, base, "lena@example.com", PASSWORD)
            for _ in range(60):
                await open_section(page, "alerts")
                await asyncio.sleep(0.5)
                if "CO₂-equivalent 1500" in await page.inner_text("#indoor-why"):
                    break
            why = await page.inner_text("#indoor-why")
            assert "CO₂ too high on Office fired" in why, why
            assert "(threshold 1000 ppm for 30 min)" in why, why
            # The rule's row says what it sees now.
            co2_row = await page.inner_text("#rules tr:has-text('CO₂ too high')")
            assert "Office firing: CO₂-equivalent 1500 to 1500 ppm for" in co2_row, co2_row
            mould = "#rules tr:has-text('Mould risk')"
            assert "RH above 70% for 24 h" in await page.inner_text(mould)
            await page.click(f"{mould} button:has-text('Edit')")
            await page.wait_for_selector("#indoor-tune", state="visible")
            await page.fill("#indoor-param-humidity_above", "65")
            await page.fill("#indoor-param-surface_temperature", "12.5")
            await page.check("#indoor-calibrating")
            await check_page(page, "instance-indoor-alerts")
            await page.click("#indoor-save")
            await page.wait_for_selector(f"{mould} >> text=RH above 65%")
            assert "within 2 °C of 12.5 °C" in await page.inner_text(mould)
            stale = "#rules tr:has-text('Stale sensor')"
            assert "pending" not in await page.inner_text(stale)  # a working sensor
            await page.click(f"{stale} button:has-text('Mute')")
            await page.wait_for_selector(f"{stale} button:has-text('Unmute')")
            await page.click("#rules tr:has-text('Device offline') button:has-text('Delete')")
            await page.wait_for_selector("#rules tr:has-text('Device offline')", state="detached")
            await page.select_option("#indoor-kind", "offline")
            await page.click("#indoor-add button[type=submit]")
            await page.wait_for_selector("#rules tr:has-text('Device offline')")
        listed = {r["kind"]: r for r in await rules(lena)}
        assert listed["mould_risk"]["params"]["humidity_above"] == 65
        assert listed["mould_risk"]["params"]["surface_temperature"] == 12.5
        assert listed["mould_risk"]["include_calibrating"] is True
        assert listed["stale_sensor"]["muted"] is True
        assert listed["offline"]["preset"] is None  # added back by the customer
    finally:
        await lena.api.aclose()
