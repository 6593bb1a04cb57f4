"""What every browser test shares: Debian's Chromium driven by Playwright, axe-core run in each
page, and screenshots at a desktop and a phone width.

``open_browser()`` launches Debian's ``chromium`` (the CI script installs it; Playwright's own
downloads are not used). ``check_page(page, name)`` is called on every page a test reaches:
it runs axe-core (bundled with axe-playwright-python, nothing fetched) and fails on any
serious or critical violation, checks that nothing overflows a 390-pixel-wide viewport
sideways, and writes ``docs/screenshots/<name>-desktop.png`` and ``<name>-phone.png``
(the folder the README names). Screenshots are taken at both widths in the same page,
resizing it, so the state a test reached is what both show.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Browser, Page, ViewportSize, async_playwright

SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
DESKTOP = ViewportSize(width=1280, height=860)
PHONE = ViewportSize(width=390, height=844)
BLOCKING = ("serious", "critical")
_axe = Axe()


@asynccontextmanager
async def open_browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless, closed on the way out."""
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: apt-get install chromium (the CI script does)"
    async with async_playwright() as driver:
        browser = await driver.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield browser
        finally:
            await browser.close()


async def new_page(browser: Browser, **context: Any) -> Page:
    """A page in a context of its own (its own cookies) at the desktop width."""
    browser_context = await browser.new_context(viewport=DESKTOP, **context)
    return await browser_context.new_page()


async def accessibility_problems(page: Page) -> list[str]:
    """axe-core's serious and critical violations on the page as it is now, one line each."""
    results = await _axe.run(page)
    problems = []
    for violation in results.response["violations"]:
        if violation.get("impact") in BLOCKING:
            targets = [", ".join(node["target"]) for node in violation["nodes"][:5]]
            problems.append(f"{violation['id']} ({violation['impact']}): {targets}")
    return problems


async def overflows_sideways(page: Page) -> bool:
    """True when the page is wider than the viewport (a phone would have to scroll sideways)."""
    return bool(
        await page.evaluate(
            "() => document.documentElement.scrollWidth > document.documentElement.clientWidth + 1"
        )
    )


async def check_page(page: Page, name: str) -> None:
    """Accessible at both widths, usable at 390 px, and a screenshot of each width."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    original = page.viewport_size or DESKTOP
    try:
        for label, size in (("desktop", DESKTOP), ("phone", PHONE)):
            await page.set_viewport_size(size)
            await page.wait_for_timeout(150)  # let a layout that depends on the width settle
            problems = await accessibility_problems(page)
            assert not problems, f"{name} at {label} width: {problems}"
            if label == "phone":
                assert not await overflows_sideways(page), f"{name} scrolls sideways at 390 px"
            await page.screenshot(path=str(SCREENSHOTS / f"{name}-{label}.png"), full_page=True)
    finally:
        await page.set_viewport_size(original)
