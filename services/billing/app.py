"""Wiring of the billing service: trials, subscriptions and the Stripe webhook gateway."""

from __future__ import annotations

from datetime import UTC, datetime

from contracts import (
    InvoiceRecorded,
    PaymentFailed,
    QuotaNoticeReported,
    StripeCustomerLinked,
    StripeEventReceived,
    SubscriptionActivated,
    SubscriptionCanceled,
    SubscriptionChanged,
    TrialExpired,
    TrialStarted,
    UsageReported,
)
from libs.runtime.outbox import outbox_worker
from libs.runtime.scheduling import every
from libs.runtime.service import ServiceDefinition, ServiceRuntime
from libs.runtime.supervision import Worker
from services.billing.access import ACCOUNT_ACCESS
from services.billing.projections import SUBSCRIPTIONS
from services.billing.reactors import billing_reactors
from services.billing.routes import billing_routes
from services.billing.settings import BillingSettings
from services.billing.stripe_payloads import purge_payloads
from services.billing.trials import expire_ended_trials
from services.billing.usage import USAGE


def _workers(runtime: ServiceRuntime) -> list[Worker]:
    settings = runtime.settings_as(BillingSettings)

    async def expire() -> int:
        return await expire_ended_trials(runtime.db(), runtime.events(), datetime.now(UTC))

    async def purge() -> int:
        return await purge_payloads(runtime.db(), settings.stripe_payload_retention_days)

    return [
        every(settings.trial_scan_seconds, "trial scheduler: trials expired", expire),
        every(settings.stripe_payload_purge_seconds, "Stripe payloads: past retention", purge),
        outbox_worker(runtime),
    ]


BILLING = ServiceDefinition(
    name="billing",
    migrations_package="services.billing.migrations",
    projections=(SUBSCRIPTIONS, USAGE, ACCOUNT_ACCESS),
    reactors=billing_reactors,
    routes=billing_routes,
    workers=_workers,
    # Every event billing appends, and the one file that appends it (each file one concern).
    emits=(
        InvoiceRecorded,  # reactors.py, as stripe_events.py decides
        PaymentFailed,  # reactors.py, as stripe_events.py decides
        QuotaNoticeReported,  # usage.py: an instance's meter at 80% or 100%
        StripeCustomerLinked,  # accounts.py: a first checkout made the Stripe customer
        StripeEventReceived,  # webhooks.py: the gateway, once per Stripe event id
        SubscriptionActivated,  # reactors.py, as stripe_events.py decides
        SubscriptionCanceled,  # reactors.py, as stripe_events.py decides
        SubscriptionChanged,  # reactors.py, as stripe_events.py decides
        TrialExpired,  # trials.py: the trial scheduler
        TrialStarted,  # reactors.py: a customer signed up
        UsageReported,  # usage.py: an instance's report
    ),
    reactor_names=(
        "start_trials",
        "apply_stripe_events",
        "cancel_closed_subscriptions",
    ),
    # A customer's own events, read for their instance's export (customer_events.py).
    reader_names=("customer_events",),
    settings_type=BillingSettings,
)
