"""Wiring of the billing service: trials, subscriptions and the Stripe webhook gateway."""

from __future__ import annotations

from libs.runtime import ServiceDefinition
from services.billing.projections import SUBSCRIPTIONS
from services.billing.reactors import billing_reactors

BILLING = ServiceDefinition(
    name="billing",
    migrations_package="services.billing.migrations",
    projections=(SUBSCRIPTIONS,),
    reactors=billing_reactors,
)
