"""Wiring of the billing service: trials, subscriptions and the Stripe webhook gateway."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from contracts import (
    PaymentFailed,
    StripeCustomerLinked,
    StripeEventReceived,
    SubscriptionActivated,
    SubscriptionCanceled,
    SubscriptionChanged,
    TrialExpired,
    TrialStarted,
    UsageReported,
)
from libs.runtime import ServiceDefinition, ServiceRuntime
from libs.scheduling import run_every
from services.billing.projections import SUBSCRIPTIONS
from services.billing.reactors import billing_reactors
from services.billing.routes import billing_routes
from services.billing.settings import BillingSettings
from services.billing.trials import expire_ended_trials
from services.billing.usage import USAGE


def _workers(runtime: ServiceRuntime) -> list[Callable[[], Awaitable[None]]]:
    seconds = runtime.settings_as(BillingSettings).trial_scan_seconds

    async def expire() -> int:
        return await expire_ended_trials(runtime.db(), runtime.events(), datetime.now(UTC))

    return [lambda: run_every(seconds, "trial scheduler: trials expired", expire)]


BILLING = ServiceDefinition(
    name="billing",
    migrations_package="services.billing.migrations",
    projections=(SUBSCRIPTIONS, USAGE),
    reactors=billing_reactors,
    routes=billing_routes,
    workers=_workers,
    emits=(
        PaymentFailed,
        StripeCustomerLinked,
        StripeEventReceived,
        SubscriptionActivated,
        SubscriptionCanceled,
        SubscriptionChanged,
        TrialExpired,
        TrialStarted,
        UsageReported,
    ),
    reactor_names=(
        "start_trials",
        "apply_stripe_events",
    ),
    settings_type=BillingSettings,
)
