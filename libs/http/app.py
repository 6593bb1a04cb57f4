"""The HTTP app every service runs: its routes plus health, metrics, OpenAPI and tracing.

``create_app`` builds it: the service's routes, ``/health/live``, ``/health/ready`` and
``/metrics`` (``health_routes``), the OpenAPI document at ``/schema``, what no route accepts
refused first (``libs/http/input_checks.py``) and every error answered as JSON
(``libs/http/errors.py``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from litestar import Litestar, MediaType, Request, Response, get
from litestar.openapi import OpenAPIConfig
from litestar.status_codes import HTTP_503_SERVICE_UNAVAILABLE
from litestar.types import ControllerRouterHandler
from opentelemetry.trace import Span
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from libs.http.errors import exception_handlers
from libs.http.input_checks import check_request_input

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]
Lifespan = Callable[[Litestar], AbstractAsyncContextManager[None]]


def client_address(request: Request[Any, Any, Any], trusted_proxy_hops: int) -> str:
    """The caller's address: the TCP peer, or, behind ``trusted_proxy_hops`` proxies that each
    append to ``X-Forwarded-For``, the entry the outermost of them wrote. What a client wrote
    itself sits left of that and is never read; with 0 hops the header is not read at all, and
    an entry that is not an IP address (a misconfigured hop count) falls back to the peer."""
    peer = request.client.host if request.client else "unknown"
    if trusted_proxy_hops <= 0:
        return peer
    hops = [
        entry.strip()
        for header in request.headers.getall("x-forwarded-for", [])
        for entry in header.split(",")
        if entry.strip()
    ]
    if len(hops) < trusted_proxy_hops:
        return peer
    try:
        return str(ipaddress.ip_address(hops[-trusted_proxy_hops]))
    except ValueError:
        return peer


def address_subject(address: str) -> str:
    """What a client address is counted under: an IPv4 address, or the /64 an IPv6 address is
    in (one subscriber holds a /64 or more, so single IPv6 addresses would count nothing)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"addr:{address[:64]}"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"addr:{ip.ipv4_mapped}"
        return f"addr:{ipaddress.IPv6Network((ip, 64), strict=False)}"
    return f"addr:{ip}"


def health_routes(
    readiness: Readiness, registry: CollectorRegistry
) -> list[ControllerRouterHandler]:
    """``/health/live``, ``/health/ready`` (and ``/health``, the original path) and ``/metrics``."""

    @get("/health/live", sync_to_thread=False, tags=["operations"])
    def live() -> dict[str, str]:
        """The process is up and serving HTTP."""
        return {"status": "live"}

    @get(["/health/ready", "/health"], tags=["operations"])
    async def ready() -> Response[dict[str, Any]]:
        """Database reachable, consumers attached, projections caught up within the bound."""
        ok, detail = await readiness()
        body = {"status": "ready" if ok else "not_ready", **detail}
        return Response(body, status_code=200 if ok else HTTP_503_SERVICE_UNAVAILABLE)

    @get("/metrics", tags=["operations"], media_type=MediaType.TEXT, sync_to_thread=False)
    def metrics() -> Response[bytes]:
        """Prometheus text exposition of this process's metrics."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return [live, ready, metrics]


def forget_query(span: Span, scope: dict[str, Any]) -> None:
    """A request's span keeps its URL without the query string, which is the client's to
    fill: one-time links carry their token there (``/verify?token=``, ``/reset?token=``), and
    whoever reads traces must not be able to reset a customer's password."""
    if not span.is_recording() or not scope.get("query_string"):
        return
    attributes: Mapping[str, object] = getattr(span, "attributes", None) or {}
    url = attributes.get("http.url")
    if isinstance(url, str):
        span.set_attribute("http.url", url.partition("?")[0])
    if "url.query" in attributes:  # the stable HTTP conventions' name for it
        span.set_attribute("url.query", "")


def create_app(
    *,
    title: str,
    route_handlers: Sequence[ControllerRouterHandler],
    readiness: Readiness,
    registry: CollectorRegistry,
    lifespan: Sequence[Lifespan] = (),
    version: str = "0.1.0",
    health: Sequence[ControllerRouterHandler] | None = None,
    unavailable: Sequence[type[Exception]] = (),
    tracing: bool = True,
) -> Litestar:
    """The litestar app of a service (or of every service, in target ``all``). ``health``
    replaces the default ``health_routes`` (a customer instance guards what they show).
    ``unavailable`` are errors of a dependency besides the database (the event log) that answer
    503 like a lost database. ``tracing`` adds a span per request; a process that never sets
    up a tracer (a customer instance) goes without, and without loading OpenTelemetry's ASGI
    instrumentation."""
    operations = health_routes(readiness, registry) if health is None else health
    plugins = []
    if tracing:
        from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin

        # A span per request; not one more per ASGI message it reads and sends.
        config = OpenTelemetryConfig(
            exclude=["/health", "/metrics"],
            exclude_spans=["receive", "send"],
            server_request_hook_handler=forget_query,
        )
        plugins.append(OpenTelemetryPlugin(config))
    return Litestar(
        route_handlers=[*operations, *route_handlers],
        lifespan=list(lifespan),
        openapi_config=OpenAPIConfig(title=title, version=version, path="/schema"),
        exception_handlers=exception_handlers(unavailable),
        before_request=check_request_input,
        plugins=plugins,
        debug=False,
        # Logging is the process's to configure (the CLI does); litestar must not replace it.
        logging_config=None,
    )
