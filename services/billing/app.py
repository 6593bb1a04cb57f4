"""Wiring of the billing service: trials, subscriptions and the Stripe webhook gateway."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from libs.runtime import ServiceDefinition, ServiceRuntime
from services.billing.projections import SUBSCRIPTIONS
from services.billing.reactors import billing_reactors
from services.billing.routes import billing_routes
from services.billing.settings import BillingSettings
from services.billing.trials import trial_scheduler_loop


def _workers(runtime: ServiceRuntime) -> list[Callable[[], Awaitable[None]]]:
    every = runtime.settings_as(BillingSettings).trial_scan_seconds
    return [lambda: trial_scheduler_loop(runtime.db, runtime.events, every)]


BILLING = ServiceDefinition(
    name="billing",
    migrations_package="services.billing.migrations",
    projections=(SUBSCRIPTIONS,),
    reactors=billing_reactors,
    routes=billing_routes,
    workers=_workers,
    settings_type=BillingSettings,
)
