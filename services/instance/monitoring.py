"""What a customer instance shows monitoring, and what it shows anyone else.

``/health/live`` is open. ``/health/ready`` (and ``/health``) answers everyone with its status
and the names of the checks that failed, nothing more; monitoring (``MONITORING_TOKEN``, which
the provisioner derives and hands the instance) also sees the detail: whose instance it is and
which license it holds. ``/metrics`` are the customer's usage, so they need monitoring's token or
the customer's own session.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from litestar import MediaType, Request, Response, get
from litestar.status_codes import HTTP_503_SERVICE_UNAVAILABLE
from litestar.types import ControllerRouterHandler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from libs.http.app import Readiness
from libs.http.auth import bearer


def failed_checks(detail: dict[str, Any]) -> list[str]:
    """The names of the checks in a readiness detail that are not ``ok``."""
    return [
        name
        for name, check in detail.items()
        if isinstance(check, dict) and check.get("ok") is False
    ]


def monitoring_routes(
    readiness: Readiness,
    registry: CollectorRegistry,
    monitoring_token: str | None,
    authorize: Callable[[Request[Any, Any, Any]], Awaitable[None]],
) -> list[ControllerRouterHandler]:
    """``/health/live``, ``/health/ready`` (``/health``) and ``/metrics`` of an instance."""

    def is_monitoring(request: Request[Any, Any, Any]) -> bool:
        token = bearer(request)
        if not token or not monitoring_token:
            return False
        return hmac.compare_digest(token.encode(), monitoring_token.encode())

    @get("/health/live", sync_to_thread=False, tags=["operations"])
    def live() -> dict[str, str]:
        """The process is up and serving HTTP."""
        return {"status": "live"}

    @get(["/health/ready", "/health"], tags=["operations"])
    async def ready(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        """Database reachable and a valid license; the detail only with monitoring's token."""
        ok, detail = await readiness()
        body: dict[str, Any] = {"status": "ready" if ok else "not_ready"}
        if is_monitoring(request):
            body.update(detail)
        elif not ok:
            body["failed"] = failed_checks(detail)
        return Response(body, status_code=200 if ok else HTTP_503_SERVICE_UNAVAILABLE)

    @get("/metrics", tags=["operations"], media_type=MediaType.TEXT)
    async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
        """Prometheus text: the instance's usage and ingest; monitoring's token or the
        customer's session."""
        if not is_monitoring(request):
            await authorize(request)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return [live, ready, metrics]
