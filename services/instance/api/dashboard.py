"""The dashboard at the instance's URL: the page, its script, style and chart library, sign-in,
its CSRF token and sign-out.

The page is served by the instance with its script and its chart library (plotly.js, from the
``plotly`` package installed from PyPI: nothing comes from a CDN, nothing is copied into the
repo), so it works offline. Its Content-Security-Policy allows scripts from the instance only:
no inline script and no ``eval`` (plotly's SVG charts need neither); styles may be inline, as
plotly sets them on the elements it draws.

Signing in posts the customer's email and password to the instance, which asks
the control plane to sign them in — with the browser's address, signed with the instance's
``LOGIN_RELAY_KEY``, so failed tries count against that browser and not against the instance —
and keeps the session token in an HttpOnly, SameSite=Strict cookie. The page changes things with
that cookie only together with the session's CSRF token (``GET /dashboard/session``, sent back
as ``X-CSRF-Token``; see ``api.access``), so another site cannot make a signed-in browser change
anything. Readings arrive live over server-sent events (``/api/stream``, in ``api.readings``).
"""

from __future__ import annotations

import functools
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx
from litestar import Controller, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie
from litestar.handlers.base import BaseRouteHandler
from litestar.params import FromPath, JSONBody
from litestar.response import File

from libs.http.app import client_address
from libs.http.auth import LOGIN_RELAY_HEADER, bearer, relayed_client_header
from libs.http.errors import (
    DomainError,
    Forbidden,
    NotFound,
    TooManyRequests,
    Unauthorized,
    UpstreamError,
)
from libs.http.validation import FieldErrors
from libs.observability.telemetry import traced_hooks
from libs.web.forms import from_another_origin, is_https
from services.instance.api.access import (
    COOKIE,
    INSTANCE,
    Instance,
    csrf_token,
    customer_session,
    session_cookie,
)
from services.instance.settings import InstanceSettings

PLOTLY = Path(str(files("plotly") / "package_data" / "plotly.min.js"))
STATIC = files("services.instance") / "static"
PAGE = STATIC / "dashboard.html"
ASSETS = {
    "dashboard.js": "application/javascript",
    "dashboard.css": "text/css",
    "indoor_alerts.js": "application/javascript",
    "calibration.js": "application/javascript",
    "quotas.js": "application/javascript",
    "integrations.js": "application/javascript",
}
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SESSION_SECONDS = 3600


class NotJson(DomainError):
    """415: the sign-in is the page's JSON, never a form."""

    status_code = 415
    code = "unsupported_media_type"


async def from_the_page(
    connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler
) -> None:
    """Sign-in and sign-out come from the dashboard's own page only: another site's page can
    post a "simple" request (a form, or fetch with ``text/plain``) with no preflight, refused
    by its ``Origin``, so no site can sign a browser in as someone else (login CSRF) or out."""
    if from_another_origin(connection):
        raise Forbidden("sign-in and sign-out are for the dashboard's own page")


async def json_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """The sign-in is the page's JSON: a form cannot send that content type, so a browser
    that sends no ``Origin`` is not signed in by another site's form either."""
    kind = connection.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise NotJson("the sign-in takes JSON (Content-Type: application/json)")


@functools.cache
def page_html() -> str:
    """The dashboard page, read once."""
    return PAGE.read_text()


@functools.cache
def asset(name: str) -> str:
    """One of the page's own files (``ASSETS``), read once."""
    return (STATIC / name).read_text()


def _retry_after(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 60


def credentials(data: dict[str, Any]) -> tuple[str, str]:
    """The email (as the control plane reads it, so the relay's signature holds) and password
    of a sign-in, or a 400 naming each one missing."""
    errors = FieldErrors()
    for name in ("email", "password"):
        value = data.get(name)
        if not isinstance(value, str) or not value:
            errors.add(name, "is required (a string)")
    errors.raise_if_any()
    return str(data["email"]).strip().lower(), str(data["password"])


async def relay_login(
    settings: InstanceSettings, email: str, password: str, browser: str
) -> httpx.Response:
    """Ask the control plane, vouching for the browser's address so that its failures count
    against it, not against this instance (every local instance is 127.0.0.1)."""
    headers = {}
    if settings.login_relay_key:
        headers[LOGIN_RELAY_HEADER] = relayed_client_header(
            settings.login_relay_key, settings.instance_customer_id, browser, email
        )
    try:
        async with httpx.AsyncClient(timeout=10, event_hooks=traced_hooks()) as client:
            return await client.post(
                f"{settings.control_plane_url.rstrip('/')}/api/customers/login",
                json={"email": email, "password": password},
                headers=headers,
            )
    except httpx.HTTPError as exc:
        raise UpstreamError("the control plane is unreachable; try again") from exc


def _error_code(answer: httpx.Response) -> str | None:
    """The ``error.code`` of the control plane's refusal, if it sent one."""
    try:
        body = answer.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("code") if isinstance(error, dict) else None


def session_token(answer: httpx.Response, customer_id: str) -> str:
    """The session token of the control plane's answer to a sign-in for ``customer_id``, or
    the refusal to give the browser."""
    if answer.status_code == 429:
        raise TooManyRequests(
            "too many failed sign-ins; try again later",
            _retry_after(answer.headers.get("retry-after")),
        )
    if answer.status_code in (400, 401):
        raise Unauthorized("wrong email or password")
    if answer.status_code == 403 and _error_code(answer) == "account_closed":
        raise Unauthorized("this account is closed")
    if answer.status_code != 200:
        raise UpstreamError("the control plane could not check the sign-in; try again")
    body = answer.json()
    if body.get("customer_id") != customer_id:
        raise Unauthorized("this dashboard belongs to another account")
    return str(body["token"])


class DashboardController(Controller):
    """``/``, ``/static/*`` and ``/dashboard/login|logout``: public, out of the OpenAPI
    document; ``/dashboard/session`` needs the session."""

    path = "/"
    include_in_schema = False
    dependencies = INSTANCE

    @get("/")
    async def page(self) -> Response[str]:
        return Response(
            page_html(),
            media_type="text/html",
            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"},
        )

    @get("/static/plotly.min.js")
    async def plotly(self) -> File:
        return File(
            PLOTLY,
            media_type="application/javascript",
            headers={"Cache-Control": "public, max-age=86400"},
            content_disposition_type="inline",
        )

    @get("/static/{name:str}")
    async def page_asset(self, name: FromPath[str]) -> Response[str]:
        """The page's own script and stylesheet."""
        if name not in ASSETS:
            raise NotFound("not found")
        return Response(
            asset(name),
            media_type=ASSETS[name],
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    @get("/dashboard/session", guards=[customer_session])
    async def session(self, request: Request[Any, Any, Any], instance: Instance) -> Response[Any]:
        """The CSRF token the page sends with its changes (``X-CSRF-Token``)."""
        token = bearer(request) or session_cookie(request) or ""
        return Response(
            {"csrf_token": csrf_token(instance.csrf_key, token)},
            headers={"Cache-Control": "no-store"},
        )

    @post(
        "/dashboard/login",
        status_code=200,
        request_max_body_size=4096,
        guards=[from_the_page, json_only],
    )
    async def login(
        self,
        data: JSONBody[dict[str, Any]],
        request: Request[Any, Any, Any],
        instance: Instance,
    ) -> Response[Any]:
        settings = instance.settings
        email, password = credentials(data)
        browser = client_address(request, settings.trusted_proxy_hops)
        answer = await relay_login(settings, email, password, browser)
        token = session_token(answer, settings.instance_customer_id)
        cookie = Cookie(
            key=COOKIE,
            value=token,
            httponly=True,
            samesite="strict",
            # Behind the TLS gateway the instance is reached over HTTP: its header counts.
            secure=is_https(request),
            path="/",
            max_age=SESSION_SECONDS,
        )
        return Response(
            {"signed_in": True, "csrf_token": csrf_token(instance.csrf_key, token)},
            cookies=[cookie],
        )

    @post("/dashboard/logout", status_code=200, guards=[from_the_page])
    async def logout(self) -> Response[Any]:
        return Response(
            {"signed_in": False},
            cookies=[Cookie(key=COOKIE, value="", max_age=0, path="/", httponly=True)],
        )
