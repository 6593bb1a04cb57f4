"""libs/web's forms alone: CSRF tokens, the cookies they and the session ride on, safe ``next``
paths, and the page's security headers; served by a small litestar app of their own."""

from __future__ import annotations

from typing import Any

import pytest
from litestar import Litestar, Request, Response, get, post
from litestar.testing import TestClient

from libs.web.forms import (
    CSRF_COOKIE,
    SESSION_COOKIE,
    CsrfTokens,
    cleared_session_cookie,
    form_fields,
    local_path,
    retry_in_words,
    session_cookie,
)
from libs.web.pages import content_security_policy

SECRET = "s" * 40


def app(secret: str | None = SECRET) -> Litestar:
    tokens = CsrfTokens(secret)

    @get("/form")
    async def form(request: Request[Any, Any, Any]) -> Response[str]:
        token, cookies = tokens.issue(request)
        return Response(token, cookies=cookies)

    @post("/form", status_code=200)
    async def submit(request: Request[Any, Any, Any]) -> Response[str]:
        fields = await form_fields(request)
        tokens.check(request, fields.get("csrf_token"))
        return Response(fields.get("name", ""), cookies=[session_cookie(request, "tok", 60)])

    @post("/out", status_code=200)
    async def out() -> Response[str]:
        return Response("", cookies=[cleared_session_cookie()])

    return Litestar([form, submit, out])


def test_a_form_posts_with_the_token_of_its_own_cookie_only() -> None:
    with TestClient(app()) as client:
        page = client.get("/form")
        cookie = page.headers["set-cookie"].lower()
        assert cookie.startswith(f"{CSRF_COOKIE}=")
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        token = page.text
        assert client.get("/form").text == token  # the cookie is kept: the same token
        assert client.post("/form", data={"csrf_token": token, "name": "x"}).text == "x"
        assert client.post("/form", data={"name": "x"}).status_code == 403
        other = token[:-1] + ("1" if token.endswith("0") else "0")  # one hex digit changed
        assert client.post("/form", data={"csrf_token": other}).status_code == 403
        assert client.post("/form", data={"csrf_token": "x" * 5000}).status_code == 403
        foreign = client.post(
            "/form", data={"csrf_token": token}, headers={"Origin": "https://evil.example"}
        )
        assert foreign.status_code == 403
        same = client.post(
            "/form", data={"csrf_token": token}, headers={"Origin": "http://testserver.local"}
        )
        assert same.status_code == 200
    with TestClient(app()) as other:
        other.get("/form")
        assert other.post("/form", data={"csrf_token": token}).status_code == 403


def test_a_token_is_bound_to_the_servers_secret() -> None:
    with TestClient(app()) as client:
        token = client.get("/form").text
        planted = client.cookies[CSRF_COOKIE]
    with TestClient(app("t" * 40), cookies={CSRF_COOKIE: planted}) as elsewhere:
        assert elsewhere.get("/form").text != token
        assert elsewhere.post("/form", data={"csrf_token": token}).status_code == 403


def test_without_a_secret_every_form_is_refused() -> None:
    with TestClient(app(None)) as client:
        assert client.get("/form").text == ""
        assert client.post("/form", data={"csrf_token": ""}).status_code == 403


def test_the_session_cookie_is_httponly_lax_and_secure_behind_https() -> None:
    with TestClient(app()) as client:
        token = client.get("/form").text
        plain = client.post("/form", data={"csrf_token": token}).headers["set-cookie"].lower()
        assert plain.startswith(f"{SESSION_COOKIE}=tok")
        assert "httponly" in plain and "samesite=lax" in plain and "max-age=60" in plain
        assert "secure" not in plain
        proxied = client.post(
            "/form", data={"csrf_token": token}, headers={"X-Forwarded-Proto": "https"}
        )
        assert "secure" in proxied.headers["set-cookie"].lower()
        cleared = client.post("/out").headers["set-cookie"].lower()
        assert cleared.startswith(f"{SESSION_COOKIE}=") and "max-age=0" in cleared


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/account", "/account"),
        ("/account/close?x=1", "/account/close?x=1"),
        (None, "/account"),
        ("", "/account"),
        ("account", "/account"),
        ("https://evil.example/", "/account"),
        ("//evil.example", "/account"),
        ("/\\evil.example", "/account"),
        ("/x\\y", "/account"),
        ("javascript:alert(1)", "/account"),
        ("/a\r\nSet-Cookie: x=1", "/account"),
        ("/" + "a" * 600, "/account"),
    ],
)
def test_next_is_only_ever_a_path_of_ours(value: str | None, expected: str) -> None:
    assert local_path(value) == expected


def test_retry_is_said_in_words() -> None:
    assert retry_in_words(0) == "in 1 second"
    assert retry_in_words(45) == "in 45 seconds"
    assert retry_in_words(900) == "in 15 minutes"
    assert retry_in_words(4 * 3600) == "in 4 hours"


def test_forms_may_post_only_here_or_to_the_origins_named() -> None:
    policy = content_security_policy(["https://checkout.stripe.com"])
    assert "form-action 'self' https://checkout.stripe.com;" in policy
    assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy
