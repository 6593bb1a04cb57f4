"""Billing's HTTP API: checkout, the billing portal, the subscription, and Stripe's webhooks."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

import asyncpg
from litestar import Request, get, post
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.params import FromPath, HeaderParameter, JSONBody
from litestar.types import ControllerRouterHandler

from contracts import StripeCustomerLinked
from libs.http.auth import SessionTokens
from libs.http.errors import Conflict, InvalidRequest, NotFound
from libs.runtime.service import ServiceRuntime
from libs.timeutil import days_remaining
from services.billing.settings import BillingSettings
from services.billing.stripe_api import StripeGateway
from services.billing.usage import check_instance, parse_report, usage_event
from services.billing.webhooks import WebhookTooLarge, receive_webhook, webhook_metrics

BODY_LIMIT = 4 * 1024
PAID_PLANS = ("starter", "professional", "enterprise")
# A Stripe subscription in these states still bills: a second checkout would charge twice.
BILLING_STATES = ("active", "past_due", "trialing", "unpaid")

IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        max_length=200,
        required=False,
        description="Retrying with the same key returns the same checkout session",
    ),
]

_ACCOUNT = """
    SELECT c.customer_id, c.email, c.company_name, c.stripe_customer_id AS linked_customer,
           s.plan, s.status, s.trial_started_at, s.trial_ends_at, s.stripe_customer_id,
           s.stripe_subscription_id, s.current_period_end, s.last_payment_failure_at,
           s.canceled_at, s.updated_at
    FROM billing_customers c LEFT JOIN subscriptions s USING (customer_id)
    WHERE c.customer_id = $1
"""


def parse_checkout(data: Any) -> str:
    """The plan a checkout body asks for (400 naming each bad field)."""
    if not isinstance(data, dict):
        raise InvalidRequest(
            "invalid request", fields=[{"field": "body", "reason": "must be a JSON object"}]
        )
    fields = [
        {"field": str(name)[:64], "reason": "is not a known field"}
        for name in sorted(set(data) - {"plan"}, key=str)
    ]
    plan = data.get("plan")
    if plan is None:
        fields.append({"field": "plan", "reason": "is required"})
    elif plan not in PAID_PLANS:
        fields.append({"field": "plan", "reason": f"must be one of {', '.join(PAID_PLANS)}"})
    if fields:
        raise InvalidRequest("invalid request", fields=fields)
    return str(plan)


def billing_routes(runtime: ServiceRuntime) -> list[ControllerRouterHandler]:
    """Checkout, portal and subscription for customers; ``POST /webhooks/stripe`` for Stripe."""
    settings = runtime.settings_as(BillingSettings)
    metrics = webhook_metrics(runtime.registry)
    sessions = SessionTokens(settings.session_secret, settings.session_ttl_seconds)
    gateway = StripeGateway(settings)

    async def account(customer_id: str) -> asyncpg.Record:
        async with runtime.db().acquire() as conn:
            row = await conn.fetchrow(_ACCOUNT, customer_id)
        if row is None:
            # A valid token for an account billing has not projected yet (a second after
            # signup), or one that is gone: try again shortly either way.
            raise NotFound("no billing account for this customer yet; try again shortly")
        return row

    async def stripe_customer(row: asyncpg.Record) -> str:
        linked = row["linked_customer"] or row["stripe_customer_id"]
        if linked:
            return str(linked)
        # Concurrent first checkouts get the same Stripe customer (idempotency key), and
        # the link event's id is derived from the pair, so it is recorded once.
        created = await gateway.create_customer(
            row["customer_id"], row["email"], row["company_name"]
        )
        await runtime.events().publish(
            StripeCustomerLinked(
                customer_id=row["customer_id"], stripe_customer_id=created, linked_via="checkout"
            ),
            customer_id=row["customer_id"],
            event_id=str(
                uuid.uuid5(uuid.NAMESPACE_URL, f"stripe-customer:{row['customer_id']}:{created}")
            ),
        )
        return created

    @post(
        "/api/billing/checkout",
        status_code=201,
        request_max_body_size=BODY_LIMIT,
        tags=["billing"],
    )
    async def checkout(
        data: JSONBody[Any], request: Request[Any, Any, Any], idempotency_key: IdempotencyKey
    ) -> dict[str, Any]:
        """A Stripe Checkout page where the customer subscribes to ``plan``."""
        customer_id = sessions.customer(request)
        plan = parse_checkout(data)
        row = await account(customer_id)
        if row["stripe_subscription_id"] and row["status"] in BILLING_STATES:
            raise Conflict(
                f"already subscribed to {row['plan']} ({row['status']}); change the plan "
                "in the billing portal (POST /api/billing/portal)"
            )
        session = await gateway.create_checkout(
            customer_id=customer_id,
            stripe_customer_id=await stripe_customer(row),
            plan=plan,
            attempt=idempotency_key or uuid.uuid4().hex,
        )
        return {
            "checkout_url": session.url,
            "session_id": session.id,
            "plan": plan,
            "expires_at": _iso(session.expires_at),
        }

    @post(
        "/api/billing/portal", status_code=201, request_max_body_size=BODY_LIMIT, tags=["billing"]
    )
    async def portal(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """A Stripe billing-portal page: change plan or card, see invoices, cancel."""
        row = await account(sessions.customer(request))
        linked = row["linked_customer"] or row["stripe_customer_id"]
        if not linked:
            raise Conflict(
                "no billing account at Stripe yet: subscribe first (POST /api/billing/checkout)"
            )
        return {"portal_url": await gateway.create_portal(str(linked))}

    @get("/api/billing/subscription", tags=["billing"])
    async def subscription(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """The customer's subscription as billing knows it."""
        row = await account(sessions.customer(request))
        if row["status"] is None:
            raise NotFound("no subscription for this customer yet; try again shortly")
        now = datetime.now(UTC)
        trial_ends = row["trial_ends_at"]
        return {
            "customer_id": row["customer_id"],
            "plan": row["plan"],
            "status": row["status"],
            "trial_ends_at": trial_ends,
            "trial_days_remaining": days_remaining(trial_ends, now)
            if trial_ends and row["status"] == "trialing"
            else None,
            "current_period_end": row["current_period_end"],
            "last_payment_failure_at": row["last_payment_failure_at"],
            "canceled_at": row["canceled_at"],
            "stripe_customer_id": row["linked_customer"] or row["stripe_customer_id"],
            "stripe_subscription_id": row["stripe_subscription_id"],
            "updated_at": row["updated_at"],
        }

    @post(
        "/webhooks/stripe",
        status_code=200,
        request_max_body_size=settings.stripe_webhook_max_bytes,
        tags=["billing"],
    )
    async def stripe_webhook(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Stripe's webhooks: verified, kept, their facts stored on the log once per event id."""
        try:
            # Refused on its Content-Length before a byte is read, or once the limit is passed.
            body = await request.body()
        except RequestEntityTooLarge:
            metrics.webhooks.labels("rejected", "unknown").inc()
            raise WebhookTooLarge(
                f"webhook body is over {settings.stripe_webhook_max_bytes} bytes "
                "(STRIPE_WEBHOOK_MAX_BYTES); it was not stored"
            ) from None
        received = await receive_webhook(
            runtime.events(),
            runtime.db(),
            body,
            request.headers.get("stripe-signature"),
            secret=settings.stripe_webhook_secret,
            tolerance=settings.stripe_webhook_tolerance_seconds,
            metrics=metrics,
        )
        return {"received": True, "id": received.stripe_event_id, "duplicate": received.duplicate}

    @post(
        "/api/instances/{customer_id:str}/usage",
        status_code=202,
        request_max_body_size=BODY_LIMIT,
        tags=["billing"],
    )
    async def report_usage(
        customer_id: FromPath[str], request: Request[Any, Any, Any]
    ) -> dict[str, Any]:
        """An instance's usage for a UTC day (its own usage token)."""
        check_instance(request, settings.usage_secret, customer_id)
        event, event_id = usage_event(customer_id, parse_report(await request.body()))
        await runtime.events().publish(event, customer_id=customer_id, event_id=event_id)
        return {"recorded": True, "day": event.day.isoformat(), "final": event.final}

    @get("/api/billing/usage", tags=["billing"])
    async def usage(request: Request[Any, Any, Any]) -> dict[str, Any]:
        """The customer's usage per day, newest first (the last 90 days)."""
        customer_id = sessions.customer(request)
        async with runtime.db().acquire() as conn:
            rows = await conn.fetch(
                "SELECT day, devices, mqtt_messages, api_requests, rejected_readings, "
                "storage_bytes, final FROM usage_days WHERE customer_id = $1 "
                "ORDER BY day DESC LIMIT 90",
                customer_id,
            )
        return {"customer_id": customer_id, "days": [dict(r) for r in rows]}

    return [checkout, portal, subscription, stripe_webhook, report_usage, usage]


def _iso(timestamp: int | None) -> str | None:
    return datetime.fromtimestamp(timestamp, UTC).isoformat() if timestamp else None
