"""Take the README's picture of the dashboard's charts (docs/images/dashboard.png).

Run it during the README's five-minute path, once `iotistic simulate` has published for a
minute or two, with the instance's URL and the customer's sign-in:

    IOTISTIC_PASSWORD='a long passphrase' .venv/bin/python docs/tools/screenshot.py \
        --url "$INSTANCE" --email ada@example.com

It signs in through the dashboard's own form, waits for the page to load its charts and for
a reading to arrive live over the page's stream, and saves a PNG of the page. It needs
playwright (a dev dependency) and a Chromium: Debian's ``chromium`` package by default.

On a machine whose cores are saturated, headless Chromium (software rendering) redrawing four
charts for every reading fell behind at 5 readings/s and never answered; the picture in the
repository was taken with `iotistic simulate --rate 1/s` restarted for the moment it took.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

CHART_HAS_POINTS = (
    "() => { const c = document.getElementById('chart-temperature');"
    " return !!(c && c.data && c.data[0].x.length > 0); }"
)


def parse_args() -> argparse.Namespace:
    """The instance, the customer's sign-in, and where to write the picture."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the instance's URL (instance_url)")
    parser.add_argument("--email", required=True, help="the customer's sign-in email")
    parser.add_argument(
        "--out", default="docs/images/dashboard.png", help="the PNG to write (default: %(default)s)"
    )
    parser.add_argument(
        "--chromium", default="/usr/bin/chromium", help="the browser (default: %(default)s)"
    )
    parser.add_argument(
        "--width", type=int, default=1100, help="viewport width (default: %(default)s)"
    )
    parser.add_argument(
        "--height", type=int, default=900, help="viewport height (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120,
        help="seconds each step may take (default: %(default)s; a busy machine is slow)",
    )
    return parser.parse_args()


def wait_until(page: Page, expression: str, seconds: float) -> None:
    """Poll ``expression`` in the page until it is true (wait_for_function polls on animation
    frames, which a headless page on a starved machine may not get)."""
    deadline = time.monotonic() + seconds
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise TimeoutError(f"still false after {seconds:.0f} s: {expression}")
        time.sleep(0.5)


def step(what: str) -> None:
    """Say what the browser is waiting for (a busy machine makes each step slow)."""
    print(f"{what} ...", file=sys.stderr, flush=True)


def main() -> int:
    """Sign in, wait for a live reading on the charts, save the page."""
    args = parse_args()
    password = os.environ.get("IOTISTIC_PASSWORD") or getpass.getpass("password: ")
    with sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=args.chromium, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.set_default_timeout(args.timeout * 1000)
            step("opening the dashboard")
            page.goto(args.url.rstrip("/") + "/")
            page.wait_for_selector("#login-form", state="visible")
            page.fill("#email", args.email)
            page.fill("#password", password)
            step("signing in")
            page.click("button[type=submit]")
            wait_until(page, "() => window.dashboardReady === true", args.timeout)
            step("waiting for the charts")
            page.click("nav button[data-section=charts]")
            for box in page.query_selector_all("#chart-devices input[type=checkbox]"):
                if not box.is_checked():
                    box.check()  # every device, side by side
            wait_until(page, CHART_HAS_POINTS, args.timeout)
            # A reading that came over the live stream, not only the history the page loaded.
            step("waiting for a live reading")
            wait_until(page, "() => !!window.lastLiveReading", args.timeout)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
        finally:
            browser.close()
    print(f"{args.out}: {Path(args.out).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
