"""The operators' customers page: only with the admin credential, a bounded and literal
search whose answers are escaped, and a customer's page with their last events (never their
secrets). Real Postgres and JetStream, and Debian's Chromium for the pages themselves."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from contracts import CustomerSignedUp, DeploymentProgressed, DeploymentSucceeded
from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.runtime.platform import Platform
from services.signup.admin_pages import PAGE_SIZE, literal_like
from services.signup.app import SIGNUP
from services.signup.customer_events import KEPT_PER_CUSTOMER, summary_of
from services.targets import build_app
from support import eventually, license_issued, serving

SCRIPT = "<script>alert('owned')</script> & Co"


@pytest.fixture(scope="module")
async def platform(settings: ServiceSettings, store: EventStore) -> Platform:
    return Platform.from_settings(settings, [SIGNUP])


@pytest.fixture(scope="module")
async def client(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(build_app(platform, "all")) as http:
        await platform.wait_started()
        yield http


@pytest.fixture(scope="module")
async def pool(settings: ServiceSettings) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(
        settings.database_url, min_size=1, max_size=2, server_settings={"search_path": "signup"}
    ) as p:
        yield p


def basic(password: str, user: str = "ops") -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture(scope="module")
def admin(settings: ServiceSettings) -> dict[str, str]:
    assert settings.admin_token
    return basic(settings.admin_token)


async def sign_up(
    store: EventStore, pool: asyncpg.Pool, company: str, email: str | None = None, **extra: object
) -> str:
    customer_id = str(uuid.uuid4())
    email = email or f"{customer_id[:8]}@example.com"
    await store.publish(
        CustomerSignedUp(
            customer_id=customer_id,
            email=email,
            email_display=email,
            company_name=company,
            signed_up_at=datetime.now(UTC),
            **extra,  # type: ignore[arg-type]
        ),
        customer_id=customer_id,
    )
    await eventually(
        lambda: pool.fetchval("SELECT 1 FROM accounts WHERE customer_id = $1", customer_id),
        what="the account",
    )
    return customer_id


async def test_the_pages_need_the_admin_credential(client, settings) -> None:
    for path in ("/admin/customers", f"/admin/customers/{uuid.uuid4()}"):
        for headers in ({}, basic("not the token" * 4), {"Authorization": "Bearer nope"}):
            response = await client.get(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.headers["www-authenticate"].startswith('Basic realm="Iotistic admin"')
        response = await client.get(path, headers={"Authorization": "Basic %%%not-base64"})
        assert response.status_code == 401
    bearer = {"Authorization": f"Bearer {settings.admin_token}"}
    assert (await client.get("/admin/customers", headers=bearer)).status_code == 200


async def test_search_finds_by_email_company_and_id_and_escapes_what_it_shows(
    client, store, pool, admin
) -> None:
    tag = uuid.uuid4().hex[:8]
    email = f"ops.{tag}@example.com"
    hostile = await sign_up(store, pool, f"{SCRIPT} {tag}", email=email)
    plain = await sign_up(store, pool, f"Fresh Air {tag}")

    by_email = await client.get("/admin/customers", params={"q": email.upper()}, headers=admin)
    assert by_email.status_code == 200
    assert hostile in by_email.text and plain not in by_email.text
    assert "<script>alert" not in by_email.text
    assert "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt; &amp; Co" in by_email.text
    policy = by_email.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert by_email.headers["cache-control"] == "no-store"

    by_company = await client.get("/admin/customers", params={"q": f"air {tag}"}, headers=admin)
    assert plain in by_company.text and hostile not in by_company.text
    by_id = await client.get("/admin/customers", params={"q": plain[:13]}, headers=admin)
    assert plain in by_id.text and hostile not in by_id.text

    # What the operator types is matched literally: a lone % or _ matches nothing here.
    for wildcard in ("%", "_", "\\"):
        literal = await client.get(
            "/admin/customers", params={"q": f"{tag}{wildcard}"}, headers=admin
        )
        assert literal.status_code == 200
        assert hostile not in literal.text and plain not in literal.text
    # And shown escaped in the search box and the heading.
    echoed = await client.get("/admin/customers", params={"q": '"><b>x'}, headers=admin)
    assert '"><b>x' not in echoed.text and "&#34;&gt;&lt;b&gt;x" in echoed.text


def test_like_patterns_are_literal() -> None:
    assert literal_like("50%_off\\") == "50\\%\\_off\\\\"


async def test_bad_search_input_is_a_400_naming_the_field(client, admin) -> None:
    for params, field in (
        ({"q": "x" * 201}, "q"),
        ({"q": "bell\x07"}, "q"),
        ({"page": "0"}, "page"),
        ({"page": "abc"}, "page"),
        ({"page": "99999"}, "page"),
    ):
        response = await client.get("/admin/customers", params=params, headers=admin)
        assert response.status_code == 400, params
        # Named on the page, or (control characters) by the platform's input check, in JSON.
        assert f"{field} must" in response.text or f'"field":"{field}"' in response.text
        assert "Traceback" not in response.text
    unknown = await client.get("/admin/customers/" + "x" * 5000, headers=admin)
    assert unknown.status_code == 404
    assert (await client.get(f"/admin/customers/{uuid.uuid4()}", headers=admin)).status_code == 404


async def test_the_search_is_paginated(client, store, pool, admin) -> None:
    tag = f"Paged {uuid.uuid4().hex[:8]}"
    for _ in range(PAGE_SIZE + 2):
        await sign_up(store, pool, tag)
    first = await client.get("/admin/customers", params={"q": tag}, headers=admin)
    assert first.text.count("/admin/customers/") == PAGE_SIZE
    assert "Older signups" in first.text and "Newer signups" not in first.text
    second = await client.get("/admin/customers", params={"q": tag, "page": 2}, headers=admin)
    assert second.text.count("/admin/customers/") == 2
    assert "Newer signups" in second.text and "Older signups" not in second.text


async def test_a_customers_page_shows_their_last_events_without_secrets(
    client, store, pool, admin
) -> None:
    customer_id = await sign_up(store, pool, "Meters Ltd", full_name="Ada Secretname")
    license = license_issued(customer_id)
    await store.publish(license, customer_id=customer_id)
    extra = KEPT_PER_CUSTOMER + 5
    for progress in range(extra):
        await store.publish(
            DeploymentProgressed(
                customer_id=customer_id, job_id="job-1", progress=progress, step="creating"
            ),
            customer_id=customer_id,
        )
    await store.publish(
        DeploymentSucceeded(
            customer_id=customer_id,
            job_id="job-1",
            backend="local",
            instance_url="http://127.0.0.1:9999",
            components={"instance": "running"},
        ),
        customer_id=customer_id,
    )

    async def page() -> httpx.Response:
        return await client.get(f"/admin/customers/{customer_id}", headers=admin)

    # Two projections (the account, its events): each catches up on its own.
    shown = await eventually(
        page,
        lambda r: "DeploymentSucceeded" in r.text and "http://127.0.0.1:9999" in r.text,
        what="the last event and the instance shown",
    )
    assert shown.status_code == 200
    assert shown.text.count("<strong>Deployment") == KEPT_PER_CUSTOMER
    assert "CustomerSignedUp" not in shown.text  # older than the last 50
    assert "progress=54" in shown.text and "progress=4," not in shown.text
    assert "http://127.0.0.1:9999" in shown.text and "ready" in shown.text
    assert license.jwt not in shown.text
    rows = await pool.fetchval(
        "SELECT count(*) FROM customer_events WHERE customer_id = $1", customer_id
    )
    assert rows == KEPT_PER_CUSTOMER


def test_an_events_summary_leaves_out_personal_data_and_tokens() -> None:
    signed_up = CustomerSignedUp(
        customer_id="c1",
        email="ada@example.com",
        email_display="Ada@Example.com",
        company_name="Analytical Engines",
        full_name="Ada Lovelace",
        signed_up_at=datetime(2026, 12, 7, tzinfo=UTC),
    )
    assert summary_of(signed_up) == (
        "plan=starter, signed_up_at=2026-12-07T00:00:00+00:00, trial_days=14"
    )
    license = license_issued("c1")
    summary = summary_of(license)
    assert license.jwt not in summary and "license_id=" in summary
    long_step = DeploymentProgressed(customer_id="c1", job_id="j", progress=1, step="s" * 500)
    assert len(summary_of(long_step)) < 200


async def test_the_pages_in_a_browser(client, store, pool, settings) -> None:
    from browser import check_page, new_page, open_browser

    tag = uuid.uuid4().hex[:8]
    customer_id = await sign_up(store, pool, f"Browser Air {tag}")
    await store.publish(license_issued(customer_id), customer_id=customer_id)
    await eventually(
        lambda: pool.fetchval(
            "SELECT count(*) FROM customer_events WHERE customer_id = $1", customer_id
        ),
        lambda n: n == 2,
        what="the events",
    )
    base = str(client.base_url)
    async with open_browser() as browser:
        page = await new_page(
            browser, http_credentials={"username": "ops", "password": settings.admin_token}
        )
        await page.goto(f"{base}/admin/customers")
        await page.get_by_label("Search").fill(f"browser air {tag}")
        await page.get_by_role("button", name="Search").click()
        await page.get_by_role("link", name=f"Browser Air {tag}").wait_for()
        await check_page(page, "admin-customers")
        await page.get_by_role("link", name=f"Browser Air {tag}").click()
        await page.get_by_role("heading", name="Last events").wait_for()
        assert await page.get_by_text("LicenseIssued").count() == 1
        await check_page(page, "admin-customer")


def test_times_are_utc() -> None:
    from services.signup.admin_pages import shown_time

    at = datetime(2026, 12, 7, 9, 30, tzinfo=UTC) + timedelta(microseconds=5)
    assert shown_time(at) == "2026-12-07 09:30:00 UTC"
