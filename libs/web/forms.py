"""Forms posted by a browser: CSRF tokens, the session cookie, and reading a form's fields.

CSRF is a double-submit token bound to the server's secret: the browser holds a random value in
an HttpOnly, SameSite=Strict cookie, and each form carries an HMAC of that value under a key
derived from the session secret. A page on another site can neither read the cookie nor compute
the HMAC, and a cookie planted from a sibling domain does not match any token it could know.
Forms whose ``Origin`` names another host are refused as well. Hand-written because litestar's
CSRF middleware is one per application, and in target ``all`` the JSON APIs (bearer tokens, no
cookie) share the application with the pages.

The session cookie holds the same token ``POST /api/customers/login`` answers with, HttpOnly and
SameSite=Lax: Lax, so that a customer coming back from a payment page on another site is still
signed in (every state-changing request is a POST with a CSRF token, which Lax does not send
cross-site anyway). Its name differs from an instance's dashboard cookie: browsers do not keep
cookies apart by port, and a local instance is the same host on another port.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie
from litestar.exceptions import PermissionDeniedException

SESSION_COOKIE = "iotistic_account"
CSRF_COOKIE = "iotistic_account_csrf"
CSRF_FIELD = "csrf_token"
CSRF_REFUSED = "this form has expired or was sent from another site: reload the page and try again"
FORM_FIELD_LIMIT = 4096


def is_https(request: Request[Any, Any, Any]) -> bool:
    """Whether the browser reached us over HTTPS (directly, or through the chart's gateway)."""
    forwarded = request.headers.get("x-forwarded-proto", "")
    return request.url.scheme == "https" or forwarded.split(",")[0].strip() == "https"


def from_another_origin(request: ASGIConnection[Any, Any, Any, Any]) -> bool:
    """Whether the browser says the request comes from a page of another origin: its
    ``Origin`` names another host (or is ``null``: a sandboxed frame, a ``data:`` page).
    Browsers send ``Origin`` with every cross-origin POST, "simple" ones too."""
    origin = request.headers.get("origin")
    return origin is not None and urlsplit(origin).netloc != request.headers.get("host", "")


class CsrfTokens:
    """Issues and checks the token every form carries."""

    def __init__(self, session_secret: str | None) -> None:
        self._key = (
            hmac.new(session_secret.encode(), b"iotistic form tokens", hashlib.sha256).digest()
            if session_secret
            else None
        )

    def _token_of(self, value: str) -> str:
        assert self._key is not None
        return hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()

    def issue(self, request: Request[Any, Any, Any]) -> tuple[str, list[Cookie]]:
        """The token for the forms of a page, and the cookie to set when the browser has none.
        Without a session secret, forms cannot be protected: the token is empty and every
        post is refused."""
        if self._key is None:
            return "", []
        value = request.cookies.get(CSRF_COOKIE, "")
        cookies = []
        if not (16 <= len(value) <= 128):
            value = secrets.token_urlsafe(32)
            cookies.append(
                Cookie(
                    key=CSRF_COOKIE,
                    value=value,
                    httponly=True,
                    samesite="strict",
                    secure=is_https(request),
                    path="/",
                )
            )
        return self._token_of(value), cookies

    def check(self, request: Request[Any, Any, Any], submitted: str | None) -> None:
        """403 unless ``submitted`` is the token of the browser's cookie and the form came from
        this host."""
        if from_another_origin(request):
            raise PermissionDeniedException(CSRF_REFUSED)
        value = request.cookies.get(CSRF_COOKIE, "")
        if self._key is None or not value or not submitted or len(submitted) > 128:
            raise PermissionDeniedException(CSRF_REFUSED)
        if not hmac.compare_digest(self._token_of(value), submitted):
            raise PermissionDeniedException(CSRF_REFUSED)


def session_cookie(request: Request[Any, Any, Any], token: str, max_age: int) -> Cookie:
    """The cookie that keeps a browser signed in for ``max_age`` seconds."""
    return Cookie(
        key=SESSION_COOKIE,
        value=token,
        httponly=True,
        samesite="lax",
        secure=is_https(request),
        path="/",
        max_age=max_age,
    )


def cleared_session_cookie() -> Cookie:
    """The cookie that signs a browser out."""
    return Cookie(key=SESSION_COOKIE, value="", max_age=0, path="/", httponly=True, samesite="lax")


def session_token(request: Request[Any, Any, Any]) -> str | None:
    """The session token a browser's cookie carries, if any."""
    return request.cookies.get(SESSION_COOKIE) or None


async def form_fields(request: Request[Any, Any, Any]) -> dict[str, str]:
    """A posted form's fields as strings (the last value of a repeated name; longer values cut
    to ``FORM_FIELD_LIMIT`` characters, which every check then refuses by length)."""
    form = await request.form()
    fields: dict[str, str] = {}
    for name, value in form.multi_items():
        if isinstance(value, str):
            fields[name] = value[:FORM_FIELD_LIMIT]
    return fields


def local_path(value: str | None, default: str = "/account") -> str:
    """``value`` when it is a path on this site (where a sign-in may send the browser next),
    else ``default``: never another origin, so a link cannot make us an open redirect.
    Refused: absolute and scheme-relative URLs (``//evil``, ``/\\evil``, which browsers read
    as another host), anything with a scheme or a control character, and over-long values."""
    if not value or len(value) > 512 or not value.startswith("/"):
        return default
    if value.startswith(("//", "/\\")) or any(ord(c) < 0x20 or c == "\\" for c in value):
        return default
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return default
    return value


def retry_in_words(seconds: int) -> str:
    """How long to wait, as a person reads it: "in 40 seconds", "in 3 minutes"."""
    if seconds < 90:
        return "in 1 second" if seconds <= 1 else f"in {seconds} seconds"
    minutes = -(-seconds // 60)
    if minutes < 90:
        return f"in {minutes} minutes"
    return f"in {-(-minutes // 60)} hours"


def field_errors(fields: list[dict[str, str]]) -> Mapping[str, str]:
    """A 400's per-field reasons (``DomainError.fields``) keyed by field, the first of each."""
    errors: dict[str, str] = {}
    for item in fields:
        errors.setdefault(item["field"], item["reason"])
    return errors
