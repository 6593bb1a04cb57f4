"""The dashboard at the instance's URL: sign-in, devices, live charts, alerts and usage.

The page is served by the instance with its chart library (plotly.js, from the ``plotly``
package installed from PyPI: nothing comes from a CDN, nothing is copied into the repo), so it
works offline. Signing in posts the customer's email and password to the instance, which asks
the control plane to sign them in — with the browser's address, signed with the instance's
``LOGIN_RELAY_KEY``, so failed tries count against that browser and not against the instance —
and keeps the session token in an HttpOnly, SameSite=Strict cookie; the cookie is accepted for
reading only (GET), so another site cannot make a signed-in browser change anything. Readings
arrive live over server-sent events (``/api/stream``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx
from litestar import Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.params import JSONBody
from litestar.response import File, ServerSentEvent, ServerSentEventMessage
from litestar.types import ControllerRouterHandler

from libs.http.app import client_address
from libs.http.auth import LOGIN_RELAY_HEADER, relayed_client_header
from libs.http.errors import InvalidRequest, TooManyRequests, Unauthorized, UpstreamError
from services.instance.readings import METRICS
from services.instance.settings import InstanceSettings

COOKIE = "iotistic_session"
PLOTLY = Path(str(files("plotly") / "package_data" / "plotly.min.js"))
PAGE = files("services.instance") / "static" / "dashboard.html"
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'"
)


class LiveReadings:
    """Fans each stored reading out to the browsers watching (bounded queues: a slow browser
    misses points, it never holds ingest up)."""

    def __init__(self) -> None:
        """No one is watching yet."""
        self._queues: set[asyncio.Queue[dict[str, Any]]] = set()

    def publish(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Hand stored readings (rows of ``readings``) to every watcher that has room."""
        if not self._queues:
            return
        for row in rows:
            reading = {
                "device_id": row[0],
                "ts": row[1].isoformat(),
                **dict(zip(METRICS, row[2:], strict=True)),
            }
            for queue in self._queues:
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(reading)

    @contextlib.contextmanager
    def watch(self) -> Any:
        """A queue of readings for one browser, while it is connected."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)


def session_cookie(request: Request[Any, Any, Any]) -> str | None:
    """The session token from the dashboard's cookie, for reading requests only."""
    if request.method not in ("GET", "HEAD"):
        return None
    return request.cookies.get(COOKIE)


def _retry_after(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 60


def dashboard_routes(
    settings: InstanceSettings,
    live: LiveReadings,
    authorize: Callable[[Request[Any, Any, Any]], Awaitable[None]],
) -> list[ControllerRouterHandler]:
    """``/``, ``/static/plotly.min.js``, ``/dashboard/login|logout`` and ``/api/stream``."""

    html = PAGE.read_text()

    @get("/", include_in_schema=False)
    async def page() -> Response[str]:
        return Response(
            html,
            media_type="text/html",
            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"},
        )

    @get("/static/plotly.min.js", include_in_schema=False)
    async def plotly() -> File:
        return File(
            PLOTLY,
            media_type="application/javascript",
            headers={"Cache-Control": "public, max-age=86400"},
            content_disposition_type="inline",
        )

    @post("/dashboard/login", status_code=200, request_max_body_size=4096, include_in_schema=False)
    async def login(
        data: JSONBody[dict[str, Any]], request: Request[Any, Any, Any]
    ) -> Response[Any]:
        email, password = data.get("email"), data.get("password")
        missing = [
            {"field": name, "reason": "is required (a string)"}
            for name, value in (("email", email), ("password", password))
            if not isinstance(value, str) or not value
        ]
        if missing or not isinstance(email, str) or not isinstance(password, str):
            raise InvalidRequest("invalid request", fields=missing)
        email = email.strip().lower()  # as the control plane reads it, so the signature holds
        answer = await relay_login(
            email, password, client_address(request, settings.trusted_proxy_hops)
        )
        if answer.status_code == 429:
            raise TooManyRequests(
                "too many failed sign-ins; try again later",
                _retry_after(answer.headers.get("retry-after")),
            )
        if answer.status_code in (400, 401):
            raise Unauthorized("wrong email or password")
        if answer.status_code != 200:
            raise UpstreamError("the control plane could not check the sign-in; try again")
        body = answer.json()
        if body.get("customer_id") != settings.instance_customer_id:
            raise Unauthorized("this dashboard belongs to another account")
        return Response(
            {"signed_in": True},
            cookies=[
                Cookie(
                    key=COOKIE,
                    value=body["token"],
                    httponly=True,
                    samesite="strict",
                    secure=request.url.scheme == "https",
                    path="/",
                    max_age=3600,
                )
            ],
        )

    async def relay_login(email: str, password: str, browser: str) -> httpx.Response:
        """Ask the control plane, vouching for the browser's address so that its failures
        count against it, not against this instance (every local instance is 127.0.0.1)."""
        headers = {}
        if settings.login_relay_key:
            headers[LOGIN_RELAY_HEADER] = relayed_client_header(
                settings.login_relay_key, settings.instance_customer_id, browser, email
            )
        try:
            async with httpx.AsyncClient(timeout=10) as client:
                return await client.post(
                    f"{settings.control_plane_url.rstrip('/')}/api/customers/login",
                    json={"email": email, "password": password},
                    headers=headers,
                )
        except httpx.HTTPError as exc:
            raise UpstreamError("the control plane is unreachable; try again") from exc

    @post("/dashboard/logout", status_code=200, include_in_schema=False)
    async def logout() -> Response[Any]:
        return Response(
            {"signed_in": False},
            cookies=[Cookie(key=COOKIE, value="", max_age=0, path="/", httponly=True)],
        )

    @get("/api/stream", tags=["readings"])
    async def stream(request: Request[Any, Any, Any]) -> ServerSentEvent:
        """Readings as they are stored (server-sent events, event ``reading``)."""
        await authorize(request)

        async def events() -> AsyncIterator[ServerSentEventMessage]:
            with live.watch() as queue:
                yield ServerSentEventMessage(comment="connected")
                while True:
                    try:
                        reading = await asyncio.wait_for(queue.get(), 15)
                    except TimeoutError:
                        yield ServerSentEventMessage(comment="keep-alive")
                        continue
                    yield ServerSentEventMessage(event="reading", data=json.dumps(reading))

        return ServerSentEvent(events())

    return [page, plotly, login, logout, stream]
