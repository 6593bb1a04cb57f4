"""Who may use the instance's API, as litestar guards.

A request carries the customer's session token (``Authorization: Bearer``, or the dashboard's
cookie). A change made with the cookie (POST, PATCH, DELETE) must also carry the session's
CSRF token in ``X-CSRF-Token`` (``csrf_token``: an HMAC of the session token under a key the
instance derives from its own secrets, which the page reads from ``GET /dashboard/session``),
so another site cannot make a signed-in browser change anything; without it, or with another
session's, it is refused (403) before the session is even looked up. A session of another
customer gets 404, as if nothing were here. The license must include API access, and each
request counts against its ``apiRequestsPerDay``. An expired license (after its grace) makes
the instance read-only: changes are refused, saying why.

Guards run before litestar reads the request's parameters and body: a caller without a session
gets 401 whatever it sent (it learns nothing of what a route takes), and every request of the
customer's that reached a route counts against the day's quota, one refused for its input too.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Any

from litestar.connection import ASGIConnection
from litestar.di import NamedDependency, Provide
from litestar.handlers.base import BaseRouteHandler
from litestar.params import SkipValidation

from libs.http.auth import bearer
from libs.http.errors import Forbidden, NotFound, TooManyRequests, Unauthorized, UpstreamError
from services.instance.auth import ControlPlaneUnavailable
from services.instance.quotas import API_LIMIT
from services.instance.state import InstanceState, instance_of, provide_instance

Connection = ASGIConnection[Any, Any, Any, Any]
COOKIE = "iotistic_session"
# The ``instance`` every handler of the API may take: injected by name, and not validated
# (it is the app's own object, not request data).
INSTANCE = {"instance": Provide(provide_instance, sync_to_thread=False)}
Instance = NamedDependency[SkipValidation[InstanceState]]


CSRF_HEADER = "x-csrf-token"
READING = ("GET", "HEAD")


def csrf_token(key: bytes, session: str) -> str:
    """The CSRF token of a session: useless with any other session, and no secret stored."""
    return hmac.new(key, f"csrf:{session}".encode(), "sha256").hexdigest()


def session_cookie(connection: Connection) -> str | None:
    """The session token from the dashboard's cookie; for a change, only together with that
    session's CSRF token (``Forbidden`` otherwise)."""
    session = connection.cookies.get(COOKIE)
    if not session or connection.scope.get("method") in READING:
        return session
    sent = connection.headers.get(CSRF_HEADER, "")
    expected = csrf_token(instance_of(connection).csrf_key, session)
    if not sent:
        raise Forbidden(
            "a change made with the dashboard's cookie needs the X-CSRF-Token header "
            "(from GET /dashboard/session)"
        )
    if not hmac.compare_digest(sent.encode(errors="replace"), expected.encode()):
        raise Forbidden("the X-CSRF-Token header does not belong to this session; reload the page")
    return session


async def customer_session(connection: Connection, _: BaseRouteHandler) -> None:
    """The customer's own session, API access in the license, and today's quota (the request
    is counted). A CORS preflight (OPTIONS) carries no credentials: litestar answers it."""
    if connection.scope.get("method") == "OPTIONS":
        return
    instance = instance_of(connection)
    try:
        who = await instance.sessions.caller(bearer(connection) or session_cookie(connection))
    except ControlPlaneUnavailable as exc:
        raise UpstreamError(f"cannot check the session: {exc}") from None
    if who == "nobody":
        raise Unauthorized(
            "a valid session token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    if who == "other":
        raise NotFound("not found")
    claims = instance.licensed()
    if not claims.features.apiAccess:
        raise Forbidden("the license does not include API access")
    now, limit = datetime.now(UTC), claims.limits.apiRequestsPerDay
    try:
        instance.api_requests.take(now, limit)
    except TooManyRequests:
        instance.ingest.refused(API_LIMIT, now, limit, "API requests")
        raise
    instance.ingest.count_api_request()


def is_monitoring(connection: Connection) -> bool:
    """Whether the request carries monitoring's token (``MONITORING_TOKEN``)."""
    token = bearer(connection)
    expected = instance_of(connection).settings.monitoring_token
    if not token or not expected:
        return False
    return hmac.compare_digest(token.encode(), expected.encode())


async def monitoring_or_customer(connection: Connection, handler: BaseRouteHandler) -> None:
    """Monitoring's token, or else the customer's session as ``customer_session`` takes it."""
    if not is_monitoring(connection):
        await customer_session(connection, handler)


async def read_write(connection: Connection, _: BaseRouteHandler) -> None:
    """Refuses changes while the license has expired (its grace included)."""
    if instance_of(connection).read_only():
        raise Forbidden(
            "read-only: the license has expired (its grace period included); renew the "
            "subscription to make changes and ingest readings again"
        )


async def alerting_licensed(connection: Connection, _: BaseRouteHandler) -> None:
    """Refuses new alert rules when the license does not include alerting."""
    if not instance_of(connection).licensed().features.alerting:
        raise Forbidden("the license does not include alerting")
