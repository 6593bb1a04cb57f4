"""Plans as data: what each plan's license allows."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from contracts import Features, Limits, Plan


class PlanSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One plan: its features and daily limits (and a price, for display only)."""

    name: Plan
    features: Features
    limits: Limits
    monthly_price_eur: int | None = None


class UnknownPlan(ValueError):
    """A plan name that is not in the table."""


_STARTER_FEATURES = Features(
    maxDevices=10, dataRetentionDays=90, alerting=True, apiAccess=True, webhooks=False
)
_STARTER_LIMITS = Limits(mqttMessagesPerDay=100_000, apiRequestsPerDay=10_000)

PLANS: Mapping[Plan, PlanSpec] = {
    # A trial is the starter plan for DEFAULT_TRIAL_DAYS.
    "trial": PlanSpec(name="trial", features=_STARTER_FEATURES, limits=_STARTER_LIMITS),
    "starter": PlanSpec(
        name="starter", features=_STARTER_FEATURES, limits=_STARTER_LIMITS, monthly_price_eur=29
    ),
    "professional": PlanSpec(
        name="professional",
        features=Features(
            maxDevices=50, dataRetentionDays=365, alerting=True, apiAccess=True, webhooks=True
        ),
        limits=Limits(mqttMessagesPerDay=1_000_000, apiRequestsPerDay=100_000),
        monthly_price_eur=99,
    ),
    "enterprise": PlanSpec(
        name="enterprise",
        features=Features(
            maxDevices=500, dataRetentionDays=1825, alerting=True, apiAccess=True, webhooks=True
        ),
        limits=Limits(mqttMessagesPerDay=10_000_000, apiRequestsPerDay=1_000_000),
        monthly_price_eur=499,
    ),
}


def plan(name: str) -> PlanSpec:
    """The plan of that name; ``UnknownPlan`` if there is none."""
    try:
        return PLANS[name]  # type: ignore[index]
    except KeyError:
        raise UnknownPlan(f"unknown plan {name!r}; plans are {', '.join(PLANS)}") from None
