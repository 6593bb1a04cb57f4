"""Steps in a customer instance's dashboard that more than one browser test takes: add a
device and publish with the very ``mosquitto_pub`` command the page shows, open a section, wait
for a section to show a text."""

from __future__ import annotations

import asyncio
import re
import subprocess
from typing import Any

from playwright.async_api import Page

MOSQUITTO_PUB = "/usr/bin/mosquitto_pub"


def run_snippet(command: str) -> None:
    """Run a shell command copied out of the page, as a customer would paste it."""
    assert command.startswith("mosquitto_pub "), command
    done = subprocess.run(
        ["/bin/sh", "-c", MOSQUITTO_PUB + command.removeprefix("mosquitto_pub")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr


async def open_section(page: Page, name: str) -> None:
    await page.click(f"nav button[data-section={name}]")
    await page.wait_for_selector(f"#section-{name}", state="visible")


async def add_device_and_publish(page: Page, name: str) -> str:
    """Add a device in the page and publish with the page's own mosquitto_pub command; return
    the command."""
    await page.fill("#device-name", name)
    await page.click("#add-device button[type=submit]")
    await page.wait_for_selector("#credentials", state="visible")
    assert await page.inner_text("#cred-name") == name
    # Copied with the page's own button, as a customer would.
    await page.click("button[data-copy=snippet-mosquitto]")
    command = await page.evaluate("navigator.clipboard.readText()")
    assert command == await page.inner_text("#snippet-mosquitto")
    for snippet in ("#snippet-python", "#snippet-esp32"):
        text = await page.text_content(snippet) or ""
        assert re.search(r"dev-[0-9a-f]{16}", text), text  # the real username, filled in
    assert "bsec2.h" in (await page.text_content("#snippet-esp32") or "")
    run_snippet(command)
    await page.wait_for_function(
        "name => [...document.querySelectorAll('#devices tbody tr')].some(row =>"
        " row.innerText.includes(name) && /online/.test(row.innerText)"
        " && /calibrated/.test(row.innerText))",
        arg=name,
        timeout=20_000,
    )
    return command


async def until_text(page: Page, section: str, selector: str, text: str) -> Any:
    """Open ``section`` again (which reloads it) until ``selector`` shows ``text``."""
    for _ in range(40):
        await open_section(page, section)
        await asyncio.sleep(0.5)
        if text in await page.inner_text(selector):
            return
    raise AssertionError(f"{selector} never showed {text!r}: {await page.inner_text(selector)}")


async def sign_in(page: Page, base: str, email: str, password: str) -> None:
    """Sign in on the instance's dashboard at ``base`` and wait until it has loaded."""
    await page.goto(base + "/")
    await page.wait_for_selector("#login-form", state="visible")
    await page.fill("#email", email)
    await page.fill("#password", password)
    await page.click("#login-form button[type=submit]")
    await page.wait_for_function("() => window.dashboardReady === true", timeout=20_000)
