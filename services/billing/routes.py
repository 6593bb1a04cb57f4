"""Billing's HTTP API: the Stripe webhook gateway (checkout and portal come next)."""

from __future__ import annotations

from typing import Any

from litestar import Request, post
from litestar.types import ControllerRouterHandler

from libs.runtime import ServiceRuntime
from services.billing.settings import BillingSettings
from services.billing.webhooks import receive_webhook, webhook_metrics

WEBHOOK_BODY_LIMIT = 1024 * 1024


def billing_routes(runtime: ServiceRuntime) -> list[ControllerRouterHandler]:
    """``POST /webhooks/stripe``."""
    settings = runtime.settings_as(BillingSettings)
    metrics = webhook_metrics(runtime.registry)

    @post(
        "/webhooks/stripe",
        status_code=200,
        request_max_body_size=WEBHOOK_BODY_LIMIT,
        tags=["billing"],
    )
    async def stripe_webhook(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Stripe's webhooks: verified, stored on the log once per event id, answered at once."""
        received = await receive_webhook(
            runtime.events(),
            await request.body(),
            request.headers.get("stripe-signature"),
            secret=settings.stripe_webhook_secret,
            tolerance=settings.stripe_webhook_tolerance_seconds,
            metrics=metrics,
        )
        return {"received": True, "id": received.stripe_event_id, "duplicate": received.duplicate}

    return [stripe_webhook]
