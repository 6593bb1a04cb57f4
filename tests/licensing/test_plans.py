"""Plans as data."""

from __future__ import annotations

import itertools

import pytest

from services.licensing.plans import PLANS, UnknownPlan, plan


def test_starter_is_what_the_product_sells() -> None:
    starter = plan("starter")
    assert (starter.features.maxDevices, starter.features.dataRetentionDays) == (10, 90)
    assert (starter.limits.mqttMessagesPerDay, starter.limits.apiRequestsPerDay) == (
        100_000,
        10_000,
    )
    assert starter.features.alerting and starter.features.apiAccess
    assert not starter.features.webhooks
    assert plan("trial").features == starter.features
    assert plan("trial").limits == starter.limits


def test_each_larger_plan_allows_at_least_as_much() -> None:
    order = [plan(n) for n in ("starter", "professional", "enterprise")]
    for small, large in itertools.pairwise(order):
        assert large.features.maxDevices > small.features.maxDevices
        assert large.features.dataRetentionDays > small.features.dataRetentionDays
        assert large.limits.mqttMessagesPerDay > small.limits.mqttMessagesPerDay
        assert large.limits.apiRequestsPerDay > small.limits.apiRequestsPerDay
        for flag in ("alerting", "apiAccess", "webhooks"):
            assert getattr(large.features, flag) >= getattr(small.features, flag)
    assert set(PLANS) == {"trial", "starter", "professional", "enterprise"}


def test_an_unknown_plan_is_refused() -> None:
    with pytest.raises(UnknownPlan, match="platinum"):
        plan("platinum")
