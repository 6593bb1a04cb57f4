"""Admin credential: a bearer token compared in constant time, required on admin routes."""

from __future__ import annotations

import hmac

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard


def admin_guard(admin_token: str | None) -> Guard:
    """A litestar guard that lets a request through only with ``Bearer <admin_token>``.

    Without a configured token, admin routes are closed to everyone rather than open.
    """

    def guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:  # type: ignore[type-arg]
        if not admin_token:
            raise PermissionDeniedException("admin routes are disabled: ADMIN_TOKEN is not set")
        header = connection.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise NotAuthorizedException(
                "admin credential required", headers={"WWW-Authenticate": "Bearer"}
            )
        if not hmac.compare_digest(presented.encode(), admin_token.encode()):
            raise NotAuthorizedException(
                "admin credential required", headers={"WWW-Authenticate": "Bearer"}
            )

    return guard
