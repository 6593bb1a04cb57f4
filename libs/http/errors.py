"""The errors a route raises, and their one translation to JSON.

A route refuses a request by raising a ``DomainError`` (``InvalidRequest``, ``NotFound``,
``Conflict``...), which carries its HTTP status. ``exception_handlers`` answers each of them,
and what litestar, msgspec, asyncpg or Python raise on a client's bad input or a dependency
away, with one JSON shape: ``{"error": {"status", "code", "message", "fields"}}``. Nothing a
client sends can make the app answer with a stack trace; unexpected failures are logged with
their trace id and answered with a plain 500.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

# asyncpg's own error for an argument it cannot encode (an int beyond 64 bits, a date out of
# range); it subclasses InterfaceError, which CONNECTION_ERRORS answers as "unavailable".
from asyncpg.exceptions._base import DataError as ArgumentError
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR, HTTP_503_SERVICE_UNAVAILABLE
from opentelemetry import trace

from libs.db.postgres import CONNECTION_ERRORS
from libs.observability.logs import escape_control

log = logging.getLogger(__name__)

# Deeper than any body of ours; msgspec itself gives up near Python's recursion limit (~1000).
MAX_JSON_DEPTH = 32


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


def invalid(field: str, reason: str) -> InvalidRequest:
    """A 400 naming one field and why."""
    return InvalidRequest("invalid request", fields=[{"field": field, "reason": reason}])


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


ExceptionHandler = Callable[[Request[Any, Any, Any], Any], Response[Any]]


def exception_handlers(unavailable: Sequence[type[Exception]] = ()) -> dict[Any, ExceptionHandler]:
    """litestar's ``exception_handlers``: every error a route may end with, answered as JSON.
    ``unavailable`` are errors of a dependency besides the database (the event log) that answer
    503 like a lost database."""
    return {
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
    }
