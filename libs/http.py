"""The HTTP app every service runs: health, metrics, OpenAPI, JSON errors and tracing.

Errors are translated to JSON once, here: ``{"error": {"status", "code", "message", "fields"}}``.
Nothing a client sends can make the app answer with a stack trace; unexpected failures are
logged with their trace id and answered with a plain 500.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from litestar import Litestar, MediaType, Request, Response, get
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR, HTTP_503_SERVICE_UNAVAILABLE
from litestar.types import ControllerRouterHandler
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from libs.db import CONNECTION_ERRORS
from libs.eventstore import EventStoreError

log = logging.getLogger(__name__)

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]
Lifespan = Callable[[Litestar], AbstractAsyncContextManager[None]]


class DomainError(Exception):
    """A request the domain refuses; carries the HTTP status it maps to."""

    status_code = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        fields: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """``fields`` name each offending field with its reason."""
        super().__init__(message)
        self.message = message
        self.fields = fields or []
        self.headers = headers or {}


class InvalidRequest(DomainError):
    """400: the request names fields that are wrong, each with its reason."""

    code = "invalid_request"


class Unauthorized(DomainError):
    """401: no valid credential."""

    status_code = 401
    code = "unauthorized"


class Forbidden(DomainError):
    """403: known caller, but the license (or the state of things) does not allow it."""

    status_code = 403
    code = "forbidden"


class NotFound(DomainError):
    """404: nothing there, or nothing this caller may see (the same answer on purpose)."""

    status_code = 404
    code = "not_found"


class Conflict(DomainError):
    """409: the thing exists already, or another request is making it."""

    status_code = 409
    code = "conflict"


class UpstreamError(DomainError):
    """502: a service we depend on (Stripe, the broker, the control plane) did not do its part;
    nothing was changed, try again."""

    status_code = 502
    code = "upstream_error"


class TooManyRequests(DomainError):
    """429: come back after ``retry_after`` seconds."""

    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        """Answered with ``Retry-After: <retry_after>``."""
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after))})


def error_body(
    status: int, code: str, message: str, fields: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    """The JSON error shape every service answers with."""
    body: dict[str, Any] = {"status": status, "code": code, "message": message}
    if fields:
        body["fields"] = fields
    return {"error": body}


def _validation_fields(exc: ValidationException) -> list[dict[str, str]]:
    fields: list[dict[str, str]] = []
    extra = exc.extra if isinstance(exc.extra, list) else []
    for item in extra:
        if isinstance(item, dict):
            key = str(item.get("key") or item.get("source") or "body")
            fields.append({"field": key, "reason": str(item.get("message", "invalid"))})
    return fields


def _on_validation(_: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    fields = _validation_fields(exc)
    message = exc.detail if isinstance(exc.detail, str) else "invalid request"
    return Response(error_body(400, "invalid_request", message, fields), status_code=400)


def _on_http(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    code = {
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        405: "method_not_allowed",
        409: "conflict",
        413: "too_large",
        429: "rate_limited",
    }.get(exc.status_code, "error")
    detail = exc.detail if isinstance(exc.detail, str) else "error"
    return Response(
        error_body(exc.status_code, code, detail),
        status_code=exc.status_code,
        headers=exc.headers or None,
    )


def _on_domain(_: Request[Any, Any, Any], exc: DomainError) -> Response[Any]:
    return Response(
        error_body(exc.status_code, exc.code, exc.message, exc.fields),
        status_code=exc.status_code,
        headers=exc.headers or None,
    )


def _on_unavailable(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    # The database or the log is away for a moment: say so, so the client retries.
    log.warning("%s %s: dependency unavailable: %r", request.method, request.url.path, exc)
    return Response(
        error_body(503, "unavailable", "a dependency is unavailable; retry shortly"),
        status_code=HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "1"},
    )


def _on_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    span = trace.get_current_span().get_span_context()
    trace_id = f"{span.trace_id:032x}" if span.is_valid else None
    log.error(
        "unhandled error on %s %s (trace %s)",
        request.method,
        request.url.path,
        trace_id,
        exc_info=exc,
    )
    body = error_body(500, "internal_error", "internal error")
    if trace_id:
        body["error"]["trace_id"] = trace_id
    return Response(body, status_code=HTTP_500_INTERNAL_SERVER_ERROR)


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


def create_app(
    *,
    title: str,
    route_handlers: Sequence[ControllerRouterHandler],
    readiness: Readiness,
    registry: CollectorRegistry,
    lifespan: Sequence[Lifespan] = (),
    version: str = "0.1.0",
    health: Sequence[ControllerRouterHandler] | None = None,
) -> Litestar:
    """The litestar app of a service (or of every service, in target ``all``). ``health``
    replaces the default ``health_routes`` (a customer instance guards what they show)."""
    operations = health_routes(readiness, registry) if health is None else health
    return Litestar(
        route_handlers=[*operations, *route_handlers],
        lifespan=list(lifespan),
        openapi_config=OpenAPIConfig(title=title, version=version, path="/schema"),
        exception_handlers={
            ValidationException: _on_validation,
            HTTPException: _on_http,
            DomainError: _on_domain,
            EventStoreError: _on_unavailable,
            **{e: _on_unavailable for e in CONNECTION_ERRORS if issubclass(e, Exception)},
            Exception: _on_unexpected,
        },
        plugins=[OpenTelemetryPlugin(OpenTelemetryConfig(exclude=["/health", "/metrics"]))],
        debug=False,
        # Logging is the process's to configure (the CLI does); litestar must not replace it.
        logging_config=None,
    )
