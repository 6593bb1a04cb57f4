"""Wiring of the billing service: trials, subscriptions and the Stripe webhook gateway."""

from __future__ import annotations

from libs.runtime import ServiceDefinition
from services.billing.projections import SUBSCRIPTIONS
from services.billing.reactors import billing_reactors
from services.billing.routes import billing_routes
from services.billing.settings import BillingSettings

BILLING = ServiceDefinition(
    name="billing",
    migrations_package="services.billing.migrations",
    projections=(SUBSCRIPTIONS,),
    reactors=billing_reactors,
    routes=billing_routes,
    settings_type=BillingSettings,
)
