"""Fleet provisioning and remote configuration in the instance's dashboard, in Debian's
Chromium: a provisioning key made in the page and shown once, a device registered with the
page's own curl commands, the device in the list with its uuid, type and provisioning state,
its configuration set in the page and its report shown next to it (published with the
device's own credentials), a hand-registered device told why it has no configuration, and the
key revoked. Every view is checked with axe-core and at 390 px (``check_page``). Everything
real: the control plane, the instance, Postgres, NATS and Mosquitto.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import pytest
from browser import check_page, new_page, open_browser
from dashboard_steps import sign_in, until_text
from playwright.async_api import Page
from test_instance import PASSWORD, client, customer  # noqa: F401 - client is a fixture

pytestmark = pytest.mark.slow


def run_shell(script: str) -> subprocess.CompletedProcess[str]:
    """Run commands copied out of the page, as a customer pastes them into a terminal."""
    return subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=60)


def device_client(mqtt: dict[str, Any]) -> aiomqtt.Client:
    """The registered device, connected with the credentials it was answered."""
    broker = urlsplit(mqtt["broker"])
    return aiomqtt.Client(
        broker.hostname or "",
        broker.port or 1883,
        username=mqtt["username"],
        password=mqtt["password"],
        identifier=mqtt["clientId"],
    )


async def create_key(page: Page, name: str, max_uses: str, expires: str) -> str:
    """Create a key in the page; the key it shows once."""
    await page.fill("#key-name", name)
    await page.fill("#key-max-uses", max_uses)
    await page.fill("#key-expires", expires)
    await page.click("#key-form button[type=submit]")
    await page.wait_for_selector("#key-shown", state="visible")
    key = await page.inner_text("#key-value")
    assert re.fullmatch(r"iotpk_[A-Za-z0-9_-]{43}", key), key
    await page.click("button[data-copy=key-value]")
    assert await page.evaluate("navigator.clipboard.readText()") == key
    return key


async def test_a_fleet_is_provisioned_and_configured_in_the_page(client) -> None:  # noqa: F811
    hana = await customer(client, "hana@example.com")
    base = str(hana.api.base_url).rstrip("/")
    try:
        async with open_browser() as browser:
            page = await new_page(browser, permissions=["clipboard-read", "clipboard-write"])
            page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
            await sign_in(page, base, "hana@example.com", PASSWORD)

            next_year = datetime.now(UTC).year + 1
            key = await create_key(page, "Building A", "5", f"{next_year}-06-30T18:00")
            curl = await page.inner_text("#key-curl")
            assert f"Bearer {key}" in curl and f"{base}/api/v1/device/register" in curl
            await page.wait_for_selector("#keys tr:has-text('Building A') >> text=0 of 5")
            (made,) = (await hana.api.get("/api/provisioning-keys")).json()["keys"]
            assert made["expires_at"].startswith(f"{next_year}-06-") and made["state"] == "active"
            await check_page(page, "instance-provisioning-key")
            listed = (await hana.api.get("/api/provisioning-keys")).json()
            assert key not in json.dumps(listed)  # shown once, never listed
            await page.click("#key-shown-done")
            assert await page.inner_text("#key-value") == ""

            # The page's curl commands, pasted: the device registers and exchanges its key.
            ran = await asyncio.to_thread(run_shell, curl)
            assert ran.returncode == 0, ran.stdout + ran.stderr
            registered, exchanged = (json.loads(line) for line in ran.stdout.splitlines()[:2])
            uuid = registered["uuid"]
            assert exchanged["status"] == "provisioned" and exchanged["uuid"] == uuid
            row = f"#devices tr:has-text('{uuid}')"
            await until_text(page, "devices", "#devices", uuid)
            text = await page.inner_text(row)
            assert "sensor-1" in text and "bme688" in text and "provisioned" in text, text
            await until_text(page, "devices", "#keys tr:has-text('Building A')", "1 of 5")
            audit = await page.inner_text("#registrations")
            assert "accepted" in audit and uuid in audit and "Building A" in audit, audit
            await check_page(page, "instance-fleet-devices")

            # Its configuration, set in the page.
            await page.click(f"{row} button:has-text('Configuration')")
            await page.wait_for_selector("#config-panes", state="visible")
            assert await page.evaluate("document.activeElement.id") == "device-config"
            assert "No configuration set yet" in await page.inner_text("#config-desired-at")
            # A custom key the API refuses: the reason shows, nothing is set.
            await page.click("#config-add-key")
            await page.fill("#custom-key-1", "bad key!")
            await page.fill("#custom-value-1", "1")
            await page.click("#config-save")
            await page.wait_for_selector("#config-error >> text=custom.bad key!")
            await page.click("#config-custom button:has-text('Remove')")
            await page.fill("#config-interval", "30")
            await page.fill("#config-offset", "-1.5")
            await page.fill("#config-heater", "HP-354")
            for key, value in (("led", "false"), ("room", "Lobby")):
                await page.click("#config-add-key")
                focused = await page.evaluate("document.activeElement.className")
                assert focused == "custom-key"  # the new row's key, ready to type
                await page.keyboard.type(key)
                await page.fill("#config-custom .kv:last-child .custom-value", value)
            await page.click("#config-save")
            await page.wait_for_selector("#config-sync >> text=waiting for the device")
            await check_page(page, "instance-device-config")

            # The device receives it (retained) and reports what it applied, without the
            # offset (the instance applies that).
            mqtt = registered["mqtt"]
            async with device_client(mqtt) as device:
                await device.subscribe(f"iot/device/{uuid}/config", qos=1)
                async with asyncio.timeout(20):
                    message = await anext(aiter(device.messages))
                desired = json.loads(message.payload)
                assert desired == {
                    "version": 1,
                    "reporting_interval": 30,
                    "temperature_offset": -1.5,
                    "heater_profile": "HP-354",
                    "custom": {"led": False, "room": "Lobby"},
                }
                applied = {k: v for k, v in desired.items() if k != "temperature_offset"}
                await device.publish(
                    f"iot/device/{uuid}/config/reported", json.dumps(applied), qos=1
                )
            await page.wait_for_selector("#config-sync >> text=in sync", timeout=30_000)
            reported = await page.inner_text("#config-reported")
            assert "reporting_interval" in reported and "HP-354" in reported, reported
            assert "temperature_offset" not in reported
            assert "last reported" in await page.inner_text("#config-reported-at")
            await check_page(page, "instance-device-config-in-sync")

            # A device added by hand is told why it has no configuration.
            hand = await hana.api.post("/api/devices", json={"name": "Hall"})
            assert hand.status_code == 201, hand.text
            await until_text(page, "devices", "#devices", "Hall")
            await page.click("#devices tr:has-text('Hall') button:has-text('Configuration')")
            await page.wait_for_selector("#config-manual", state="visible")
            assert "needs a provisioning-key registration" in await page.inner_text(
                "#config-manual"
            )
            assert await page.is_hidden("#config-panes")

            # Revoked: no more registrations with it; the registered device stays.
            await page.click("#keys tr:has-text('Building A') button:has-text('Revoke')")
            await page.wait_for_selector("#keys tr:has-text('Building A') >> text=revoked")
            refused = await asyncio.to_thread(run_shell, curl)
            assert refused.returncode != 0 and "revoked" in refused.stdout, refused.stdout
            assert "key-exchange" not in refused.stderr + refused.stdout  # stopped at the refusal
            assert len(refused.stdout.splitlines()) == 1, refused.stdout
            await until_text(page, "devices", "#registrations", "refused")
            assert uuid in await page.inner_text("#devices")
            await check_page(page, "instance-provisioning-revoked")
    finally:
        await hana.api.aclose()
