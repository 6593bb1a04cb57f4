"""What a customer may send to make an integration or a backfill, checked before anything is
stored: each wrong field named with its reason, never a 500."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from libs.http.errors import InvalidRequest
from services.instance.integrations.backfills import parse_backfill
from services.instance.integrations.store import (
    WebhooksNotLicensed,
    parse_integration,
)
from services.instance.webhook_targets import WebhookTargets

NOW = datetime(2026, 12, 7, 12, tzinfo=UTC)


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"to": "2026-01-01T00:00:00Z"}, "from", "is required: an ISO 8601 time with its offset"),
        ({"from": 5, "to": "2026-01-01T00:00:00Z"}, "from", "is required"),
        ({"from": "2026-01-01T00:00:00", "to": "2026-01-02T00:00:00Z"}, "from", "offset"),
        ({"from": "0001-01-01T00:00:00+14:00", "to": "2026-01-01T00:00:00Z"}, "from", "range"),
        ({"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "to", "after"),
        ({"from": "2027-01-02T00:00:00Z", "to": "2027-02-01T00:00:00Z"}, "from", "future"),
        ({"from": "2026-01-01T00:00:00Z", "to": "2026-01-02Z", "rate": 1.5}, "rate", "whole"),
        ({"from": "2026-01-01T00:00:00Z", "to": "2026-01-02Z", "rate": True}, "rate", "whole"),
        ({"from": "2026-01-01T00:00:00Z", "to": "2026-01-02Z", "rate": 10**9}, "rate", "5000"),
        ({"from": "2026-01-01T00:00:00Z", "to": "2026-01-02Z", "more": 1}, "more", "known"),
    ],
)
def test_a_backfill_names_each_wrong_field(body: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(InvalidRequest) as bad:
        parse_backfill(body, NOW)
    named = {f["field"]: f["reason"] for f in bad.value.fields}
    assert field in named, bad.value.fields
    assert reason in named[field]


def test_a_backfill_range_is_kept_in_utc() -> None:
    start, end, rate = parse_backfill(
        {"from": "2026-01-01T02:00:00+02:00", "to": "9999-12-31T23:00:00-00:30"}, NOW
    )
    assert start == datetime(2026, 1, 1, tzinfo=UTC)
    assert start.tzinfo is UTC
    assert end.tzinfo is UTC
    assert rate == 500


async def test_an_integration_needs_the_webhooks_feature_before_anything_else() -> None:
    with pytest.raises(WebhooksNotLicensed):
        await parse_integration({"name": "x"}, False, WebhookTargets())


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "a\\u0000b", "url": "http://192.0.2.1/", "kinds": ["readings"]}, "name"),
        ({"name": 5, "url": "http://192.0.2.1/", "kinds": ["readings"]}, "name"),
        ({"name": "n", "url": None, "kinds": ["readings"]}, "url"),
        ({"name": "n", "kinds": ["readings"]}, "url"),
        ({"name": "n", "url": "http://127.0.0.1/", "kinds": ["readings"]}, "url"),
        ({"name": "n", "url": "http://[::ffff:10.0.0.1]/", "kinds": ["readings"]}, "url"),
        ({"name": "n", "url": "http://192.0.2.1:0/", "kinds": ["readings"]}, "url"),
        ({"name": "n", "url": "http://192.0.2.1/", "kinds": [["readings"]]}, "kinds"),
        ({"name": "n", "url": "http://192.0.2.1/", "kinds": None}, "kinds"),
    ],
)
async def test_an_integration_names_each_wrong_field(body: dict[str, Any], field: str) -> None:
    body = {k: v.replace("\\u0000", "\x00") if isinstance(v, str) else v for k, v in body.items()}
    with pytest.raises(InvalidRequest) as bad:
        await parse_integration(body, True, WebhookTargets())
    assert field in [f["field"] for f in bad.value.fields], bad.value.fields
