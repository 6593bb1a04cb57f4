"""The HTTP app every service runs: health, metrics, OpenAPI, JSON errors and tracing.

Errors are translated to JSON once, here: ``{"error": {"status", "code", "message", "fields"}}``.
Nothing a client sends can make the app answer with a stack trace; unexpected failures are
logged with their trace id and answered with a plain 500.

Before any route runs, what a client sent is checked once for what no route accepts (see
``check_request_input``): control characters in the path or a query value, a parameter given twice,
and in a JSON body invalid UTF-8, nesting deeper than ``MAX_JSON_DEPTH``, a NUL in a string or an
integer beyond 64 bits. Each is a 400 naming the field and the reason. Values that get past that and
still cannot be taken (a time or number out of range, a character Postgres cannot store) are 400s
too, from the mappers below, rather than the 500 they would otherwise be.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import parse_qsl

import asyncpg
import msgspec

# asyncpg's own error for an argument it cannot encode (an int beyond 64 bits, a date out of
# range); it subclasses InterfaceError, which CONNECTION_ERRORS answers as "unavailable".
from asyncpg.exceptions._base import DataError as ArgumentError
from litestar import Litestar, MediaType, Request, Response, get
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR, HTTP_503_SERVICE_UNAVAILABLE
from litestar.types import ControllerRouterHandler
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from libs.db.postgres import CONNECTION_ERRORS
from libs.observability.logs import CONTROL_CHARACTERS, escape_control

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


# --- what no route accepts ----------------------------------------------------------------------

# Deeper than any body of ours; msgspec itself gives up near Python's recursion limit (~1000).
MAX_JSON_DEPTH = 32
MAX_QUERY_PARAMETERS = 50
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def invalid(field: str, reason: str) -> InvalidRequest:
    """A 400 naming one field and why."""
    return InvalidRequest("invalid request", fields=[{"field": field, "reason": reason}])


def control_character_reason(text: str) -> str | None:
    """Why ``text`` may not be taken as it is (its first control character), or None."""
    for character in text:
        if ord(character) in CONTROL_CHARACTERS:
            return f"must not contain control characters (found U+{ord(character):04X})"
    return None


def _check_path(path: str) -> None:
    reason = control_character_reason(path)
    if reason:
        raise invalid("path", reason)


def _check_query(raw: bytes) -> None:
    try:
        pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise invalid("query", "is not valid UTF-8 once percent-decoded") from None
    seen: set[str] = set()
    for name, value in pairs:
        field = escape_control(name)[:64]
        reason = control_character_reason(name) or control_character_reason(value)
        if reason:
            raise invalid(field, reason)
        if name in seen:
            # No parameter of ours is a list: a second value would be silently ignored.
            raise invalid(field, "is given more than once")
        seen.add(name)
    if len(seen) > MAX_QUERY_PARAMETERS:
        raise invalid("query", f"has more than {MAX_QUERY_PARAMETERS} parameters")


def _json_problem(value: Any) -> tuple[str, str] | None:
    """The first field (a JSON path) of a decoded body that no route may take, and why."""
    pending: list[tuple[str, Any, int]] = [("", value, 0)]
    while pending:
        path, item, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            # The body as a whole, as when the decoder itself gives up (how deep that is depends
            # on the process's recursion limit): the path would be the depth in brackets.
            return "body", f"is nested too deeply (at most {MAX_JSON_DEPTH} levels)"
        if isinstance(item, str):
            if "\x00" in item:
                return path or "body", "must not contain NUL characters"
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int):
            if not INT64_MIN <= item <= INT64_MAX:
                return path or "body", "is out of range (a 64-bit integer at most)"
        elif isinstance(item, dict):
            for key, member in item.items():
                name = f"{path}.{key}" if path else str(key)
                if "\x00" in key:
                    return escape_control(name)[:64], "must not contain NUL characters"
                pending.append((name[:64], member, depth + 1))
        elif isinstance(item, list):
            pending.extend((f"{path}[{i}]", member, depth + 1) for i, member in enumerate(item))
    return None


def check_json_body(body: bytes) -> None:
    """400 naming the field for a body that is not JSON or holds what no route may take."""
    try:
        value = msgspec.json.decode(body)
    except UnicodeDecodeError:
        raise invalid("body", "is not valid UTF-8") from None
    except RecursionError:
        raise invalid("body", f"is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except msgspec.ValidationError:  # msgspec's only one here: a number beyond a double's range
        raise invalid("body", "holds a number out of range") from None
    except msgspec.DecodeError as exc:
        raise invalid("body", str(exc)) from None
    problem = _json_problem(value)
    if problem:
        raise invalid(*problem)


async def check_request_input(request: Request[Any, Any, Any]) -> None:
    """Every route's first step (litestar's ``before_request``, after its guards): the path,
    the query and a JSON body checked for what no route accepts."""
    _check_path(request.scope["path"])
    _check_query(request.scope.get("query_string", b""))
    if "data" in request.route_handler.parsed_fn_signature.parameters:
        body = await request.body()
        if body:
            check_json_body(body)


def error_body(
    status: int, code: str, message: str, fields: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    """The JSON error shape every service answers with."""
    body: dict[str, Any] = {"status": status, "code": code, "message": message}
    if fields:
        body["fields"] = fields
    return {"error": body}


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


def _refused(field: str, reason: str) -> Response[Any]:
    fields = [{"field": field, "reason": reason}]
    return Response(error_body(400, "invalid_request", "invalid request", fields), status_code=400)


def _on_undecodable(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    # Decoding what the client sent (a body read by hand, a Stripe payload) is where these come
    # from: invalid UTF-8 in a string, or nesting deeper than the decoder's recursion limit.
    if isinstance(exc, RecursionError):
        return _refused("body", f"is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
    return _refused("body", "is not valid UTF-8")


def _on_out_of_range(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    # A value the checks above let through and Python or Postgres could not take: the client's
    # value, not our fault, but a route that should have named the field. Logged to find it.
    log.warning(
        "%s %s: refused a value out of range: %s",
        request.method,
        escape_control(request.url.path),
        type(exc).__name__,
    )
    if isinstance(exc, asyncpg.exceptions.CharacterNotInRepertoireError):
        return _refused("request", "holds a character that cannot be stored")
    return _refused("request", "a number or a time in it is out of range")


def _on_unavailable(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    # The database or the log is away for a moment: say so, so the client retries.
    log.warning(
        "%s %s: dependency unavailable: %r", request.method, escape_control(request.url.path), exc
    )
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
        escape_control(request.url.path),
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

        plugins.append(OpenTelemetryPlugin(OpenTelemetryConfig(exclude=["/health", "/metrics"])))
    return Litestar(
        route_handlers=[*operations, *route_handlers],
        lifespan=list(lifespan),
        openapi_config=OpenAPIConfig(title=title, version=version, path="/schema"),
        exception_handlers={
            ValidationException: _on_validation,
            HTTPException: _on_http,
            DomainError: _on_domain,
            **{e: _on_unavailable for e in unavailable},
            **{e: _on_unavailable for e in CONNECTION_ERRORS if issubclass(e, Exception)},
            UnicodeDecodeError: _on_undecodable,
            RecursionError: _on_undecodable,
            OverflowError: _on_out_of_range,
            ArgumentError: _on_out_of_range,
            asyncpg.exceptions.DataError: _on_out_of_range,
            Exception: _on_unexpected,
        },
        before_request=check_request_input,
        plugins=plugins,
        debug=False,
        # Logging is the process's to configure (the CLI does); litestar must not replace it.
        logging_config=None,
    )
