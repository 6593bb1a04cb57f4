"""Billing's HTTP API: checkout, the billing portal, the subscription, usage, Stripe's webhooks.

Thin translations: each handler reads what the request says and hands it to ``accounts.py``
(the customer's commands), ``usage.py`` or ``webhooks.py``. What they need comes in as litestar
dependencies, made per request from the service's runtime (``billing_routes``).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

import asyncpg
from litestar import Controller, Request, Router, get, post
from litestar.di import NamedDependency, Provide
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.params import FromPath, HeaderParameter, JSONBody
from litestar.response import Stream
from litestar.types import ControllerRouterHandler

from libs.eventlog.store import EventStore
from libs.http.auth import SessionTokens
from libs.http.errors import invalid
from libs.http.validation import FieldErrors, json_object
from libs.runtime.service import ServiceRuntime
from libs.web.forms import CsrfTokens
from services.billing.access import CustomerSessions
from services.billing.accounts import BillingAccounts
from services.billing.customer_events import customer_events
from services.billing.decisions import PAID_PLANS
from services.billing.pages import AccountBillingForms
from services.billing.settings import BillingSettings
from services.billing.stripe_api import StripeGateway
from services.billing.usage import (
    check_instance,
    parse_notice,
    parse_report,
    record_quota_notice,
    record_usage,
    usage_days,
)
from services.billing.webhooks import (
    WebhookMetrics,
    WebhookTooLarge,
    receive_webhook,
    webhook_metrics,
)

BODY_LIMIT = 4 * 1024
# What a subject's key may be (``EventStore.subject``).
EVENT_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        max_length=200,
        required=False,
        description="Retrying with the same key returns the same checkout session",
    ),
]


def parse_checkout(data: Any) -> str:
    """The plan a checkout body asks for (400 naming each bad field)."""
    body = json_object(data)
    errors = FieldErrors()
    errors.unknown(body, {"plan"})
    plan = body.get("plan")
    if plan is None:
        errors.add("plan", "is required")
    elif plan not in PAID_PLANS:
        errors.add("plan", f"must be one of {', '.join(PAID_PLANS)}")
    errors.raise_if_any()
    return str(plan)


class CustomerBillingController(Controller):
    """A signed-in customer's billing: checkout, portal, subscription and usage."""

    path = "/api/billing"
    tags = ("billing",)

    @post("/checkout", status_code=201, request_max_body_size=BODY_LIMIT)
    async def checkout(
        self,
        data: JSONBody[Any],
        session_customer_id: NamedDependency[str],
        accounts: NamedDependency[BillingAccounts],
        idempotency_key: IdempotencyKey,
    ) -> dict[str, Any]:
        """A Stripe Checkout page where the customer subscribes to ``plan``."""
        plan = parse_checkout(data)
        attempt = idempotency_key or uuid.uuid4().hex
        return await accounts.checkout(session_customer_id, plan, attempt)

    @post("/portal", status_code=201, request_max_body_size=BODY_LIMIT)
    async def portal(
        self, session_customer_id: NamedDependency[str], accounts: NamedDependency[BillingAccounts]
    ) -> dict[str, Any]:
        """A Stripe billing-portal page: change plan or card, see invoices, cancel."""
        return await accounts.portal(session_customer_id)

    @get("/subscription")
    async def subscription(
        self, session_customer_id: NamedDependency[str], accounts: NamedDependency[BillingAccounts]
    ) -> dict[str, Any]:
        """The customer's subscription as billing knows it."""
        return await accounts.subscription(session_customer_id, datetime.now(UTC))

    @get("/usage")
    async def usage(
        self, session_customer_id: NamedDependency[str], pool: NamedDependency[asyncpg.Pool]
    ) -> dict[str, Any]:
        """The customer's usage per day, newest first (the last 90 days)."""
        days = await usage_days(pool, session_customer_id)
        return {"customer_id": session_customer_id, "days": days}


class UsageReportController(Controller):
    """Where customers' instances report their usage (each with its own usage token)."""

    path = "/api/instances"
    tags = ("billing",)

    @post("/{customer_id:str}/usage", status_code=202, request_max_body_size=BODY_LIMIT)
    async def report_usage(
        self,
        customer_id: FromPath[str],
        request: Request[Any, Any, Any],
        settings: NamedDependency[BillingSettings],
        events: NamedDependency[EventStore],
    ) -> dict[str, Any]:
        """An instance's usage for a UTC day (its own usage token)."""
        check_instance(request, settings.usage_secret, customer_id)
        event = await record_usage(events, customer_id, parse_report(await request.body()))
        return {"recorded": True, "day": event.day.isoformat(), "final": event.final}

    @post("/{customer_id:str}/quota-notices", status_code=202, request_max_body_size=BODY_LIMIT)
    async def report_quota_notice(
        self,
        customer_id: FromPath[str],
        request: Request[Any, Any, Any],
        settings: NamedDependency[BillingSettings],
        events: NamedDependency[EventStore],
    ) -> dict[str, Any]:
        """An instance's meter reached 80% or 100% of its limit (its own usage token)."""
        check_instance(request, settings.usage_secret, customer_id)
        notice = parse_notice(await request.body())
        event = await record_quota_notice(events, customer_id, notice)
        return {"recorded": True, "meter": event.meter, "level": event.level}

    @get("/{customer_id:str}/events", media_type="application/x-ndjson")
    async def events_of_customer(
        self,
        customer_id: FromPath[str],
        request: Request[Any, Any, Any],
        settings: NamedDependency[BillingSettings],
        events: NamedDependency[EventStore],
        reading: NamedDependency[asyncio.Lock],
    ) -> Stream:
        """The customer's own events from the log, as stored, one JSON line each (its
        instance's usage token): what the instance puts in the customer's export archive."""
        check_instance(request, settings.usage_secret, customer_id)
        if not EVENT_KEY.match(customer_id):
            raise invalid("customer_id", "is not a customer id")
        return Stream(customer_events(events, customer_id, reading))


class StripeWebhookController(Controller):
    """Stripe's webhooks (the body limit is the router's: ``STRIPE_WEBHOOK_MAX_BYTES``)."""

    path = "/webhooks"
    tags = ("billing",)

    @post("/stripe", status_code=200)
    async def stripe_webhook(
        self,
        request: Request[Any, Any, Any],
        settings: NamedDependency[BillingSettings],
        events: NamedDependency[EventStore],
        pool: NamedDependency[asyncpg.Pool],
        metrics: NamedDependency[WebhookMetrics],
    ) -> dict[str, Any]:
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
            events,
            pool,
            body,
            request.headers.get("stripe-signature"),
            secret=settings.stripe_webhook_secret,
            tolerance=settings.stripe_webhook_tolerance_seconds,
            metrics=metrics,
        )
        return {"received": True, "id": received.stripe_event_id, "duplicate": received.duplicate}


def billing_routes(runtime: ServiceRuntime) -> list[ControllerRouterHandler]:
    """Checkout, portal, subscription and usage for customers (and the account page's forms
    for the first two); usage reports for instances; ``POST /webhooks/stripe`` for Stripe."""
    settings = runtime.settings_as(BillingSettings)
    csrf = CsrfTokens(settings.session_secret)
    gateway = StripeGateway(settings)
    metrics = webhook_metrics(runtime.registry)
    reading = asyncio.Lock()

    # Closures, not bound methods: litestar deep-copies a router's dependencies as it mounts
    # them, and a bound method would take the whole runtime along. Each is made per request:
    # the pool and the log are there only once the service has started.
    def accounts() -> BillingAccounts:
        return BillingAccounts(runtime.db(), runtime.events(), gateway)

    def events() -> EventStore:
        return runtime.events()

    def pool() -> asyncpg.Pool:
        return runtime.db()

    # Valid and still holding: not from before a password reset, nor of a closed account.
    sessions = CustomerSessions(
        SessionTokens(settings.session_secret, settings.session_ttl_seconds), pool
    )

    async def session_customer_id(request: Request[Any, Any, Any]) -> str:
        return await sessions.customer(request)

    dependencies = {
        "accounts": Provide(accounts, sync_to_thread=False),
        "events": Provide(events, sync_to_thread=False),
        "pool": Provide(pool, sync_to_thread=False),
        "session_customer_id": Provide(session_customer_id),
        "settings": Provide(lambda: settings, sync_to_thread=False),
        "metrics": Provide(lambda: metrics, sync_to_thread=False),
        # One read of the log at a time through billing's reader consumer (customer_events).
        "reading": Provide(lambda: reading, sync_to_thread=False),
        "sessions": Provide(lambda: sessions, sync_to_thread=False),
        "csrf": Provide(lambda: csrf, sync_to_thread=False),
    }
    return [
        Router(
            "/",
            route_handlers=[CustomerBillingController, UsageReportController, AccountBillingForms],
            dependencies=dependencies,
        ),
        Router(
            "/",
            route_handlers=[StripeWebhookController],
            dependencies=dependencies,
            request_max_body_size=settings.stripe_webhook_max_bytes,
        ),
    ]
