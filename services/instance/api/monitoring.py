"""What a customer instance shows monitoring, and what it shows anyone else.

``/health/live`` is open. ``/health/ready`` (and ``/health``) answers everyone with its status
and the names of the checks that failed, nothing more; monitoring (``MONITORING_TOKEN``, which
the provisioner derives and hands the instance) also sees the detail: whose instance it is and
which license it holds. ``/metrics`` are the customer's usage, so they need monitoring's token or
the customer's own session.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, MediaType, Request, Response, get
from litestar.status_codes import HTTP_503_SERVICE_UNAVAILABLE
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.instance.api.access import INSTANCE, Instance, is_monitoring, monitoring_or_customer


def failed_checks(detail: dict[str, Any]) -> list[str]:
    """The names of the checks in a readiness detail that are not ``ok``."""
    return [
        name
        for name, check in detail.items()
        if isinstance(check, dict) and check.get("ok") is False
    ]


class MonitoringController(Controller):
    """``/health/live``, ``/health/ready`` (``/health``) and ``/metrics`` of an instance."""

    path = "/"
    dependencies = INSTANCE

    @get("/health/live", sync_to_thread=False, tags=["operations"])
    def live(self) -> dict[str, str]:
        """The process is up and serving HTTP."""
        return {"status": "live"}

    @get(["/health/ready", "/health"], tags=["operations"])
    async def ready(
        self, request: Request[Any, Any, Any], instance: Instance
    ) -> Response[dict[str, Any]]:
        """Database reachable and a valid license; the detail only with monitoring's token."""
        ok, detail = await instance.readiness()
        body: dict[str, Any] = {"status": "ready" if ok else "not_ready"}
        if is_monitoring(request):
            body.update(detail)
        elif not ok:
            body["failed"] = failed_checks(detail)
        return Response(body, status_code=200 if ok else HTTP_503_SERVICE_UNAVAILABLE)

    @get(
        "/metrics",
        tags=["operations"],
        media_type=MediaType.TEXT,
        guards=[monitoring_or_customer],
    )
    async def metrics(self, instance: Instance) -> Response[bytes]:
        """Prometheus text: the instance's usage and ingest; monitoring's token or the
        customer's session."""
        return Response(generate_latest(instance.registry), media_type=CONTENT_TYPE_LATEST)
