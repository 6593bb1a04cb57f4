"""The instance API's guards and request checks, without servers: every ``/api`` route wants the
customer's session, the day's API quota refuses past the license's limit until midnight UTC,
and a request body names every bad field (alert rules, device registrations)."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from libs.http.errors import InvalidRequest, TooManyRequests
from libs.servers.ports import free_port
from services.instance.alerts.rules import WebhooksNotLicensed, parse_rule
from services.instance.api.devices import device_name
from services.instance.app import create_instance_app
from services.instance.settings import InstanceSettings
from services.instance.state import ApiRequestsToday
from support import serving


def test_the_api_quota_refuses_past_the_limit_until_midnight_utc() -> None:
    today = ApiRequestsToday(day=datetime(2026, 3, 1, tzinfo=UTC).date())
    evening = datetime(2026, 3, 1, 23, 59, 0, tzinfo=UTC)
    today.take(evening, 2)
    today.take(evening, 2)
    with pytest.raises(TooManyRequests) as refused:
        today.take(evening, 2)
    assert refused.value.headers == {"Retry-After": "61"}
    assert today.count == 2
    today.take(datetime(2026, 3, 2, 0, 0, 1, tzinfo=UTC), 2)  # a new day, counted afresh
    assert today.count == 1


async def test_a_rule_names_each_bad_field_and_checks_its_webhook_last() -> None:
    with pytest.raises(InvalidRequest) as bad:
        await parse_rule(
            {"metric": "temperature", "operator": "=", "for_seconds": -1, "colour": "red"}, True
        )
    assert [(f["field"], f["reason"]) for f in bad.value.fields] == [
        ("colour", "is not a known field"),
        ("operator", "must be one of > >= < <="),
        ("threshold", "must be a number"),
        ("for_seconds", "must be whole seconds from 0 to 86400"),
    ]
    with pytest.raises(InvalidRequest) as wrong_metric:
        await parse_rule({"metric": "warmth", "webhook_url": "ftp://x"}, False)
    assert [f["field"] for f in wrong_metric.value.fields] == ["metric"]
    with pytest.raises(WebhooksNotLicensed):
        await parse_rule({"metric": "no_data", "webhook_url": "https://example.com/"}, False)
    with pytest.raises(InvalidRequest) as not_object:
        await parse_rule(["metric"], True)
    assert not_object.value.message == "invalid rule"
    assert not_object.value.fields == [{"field": "body", "reason": "must be a JSON object"}]
    rule = await parse_rule({"metric": "no_data", "for_seconds": 60}, False)
    assert (rule.name, rule.operator, rule.threshold, rule.devices) == ("no_data", None, None, [])


def test_a_device_name_is_checked_with_every_bad_field_named() -> None:
    with pytest.raises(InvalidRequest) as bad:
        device_name({"nom": "x"})
    assert bad.value.fields == [
        {"field": "nom", "reason": "is not a known field"},
        {"field": "name", "reason": "is required"},
    ]
    with pytest.raises(InvalidRequest) as bell:
        device_name({"name": "bell\x07"})
    assert bell.value.fields[0]["reason"] == "must not contain control characters (found U+0007)"
    assert device_name({"name": "  porch "}) == "porch"


@pytest.mark.slow
async def test_every_api_route_wants_the_customers_session() -> None:
    settings = msgspec.convert(
        {
            "instance_customer_id": "c-1",
            # Nothing answers there: the routes are refused before they would need it.
            "database_url": f"postgresql://nobody@127.0.0.1:{free_port()}/none",
            "license_jwks_url": f"http://127.0.0.1:{free_port()}/jwks",
            "mqtt_port": free_port(),
        },
        InstanceSettings,
    )
    app = create_instance_app(settings)
    routes = [
        (method, route.path_format)
        for route in app.routes
        if route.path.startswith("/api/")
        for method in sorted(route.methods - {"OPTIONS"})
    ]
    # Fleet devices register themselves with a provisioning key or their own API key, no
    # session (tests/instance/test_registration_attacks.py).
    by_device = {r for r in routes if r[1].startswith("/api/v1/device/")}
    assert by_device == {
        ("POST", "/api/v1/device/register"),
        ("POST", "/api/v1/device/{uuid}/key-exchange"),
    }
    routes = [r for r in routes if r not in by_device]
    # 23; /api/quotas(/limited, /stream), a device's calibration and PUT on alert rules (5);
    # the integrations' 9 (tests/instance/test_integrations_api.py); export, import and a
    # device's new credentials (3).
    assert len(routes) == 40
    async with serving(app) as client:
        for method, path in routes:
            answer = await client.request(
                method,
                path.format(
                    device_id="d1",
                    rule_id="r1",
                    key_id="k1",
                    integration_id="i1",
                    backfill_id="b1",
                ),
            )
            assert answer.status_code == 401, (method, path, answer.text)
            assert answer.headers["www-authenticate"] == "Bearer"
            assert answer.json()["error"]["code"] == "unauthorized"
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/dashboard/session")).status_code == 401
        assert (await client.get("/health/live")).json() == {"status": "live"}
        # A preflight carries no credentials: answered by litestar, not refused, not counted.
        preflight = await client.options("/api/devices")
        assert preflight.status_code == 204
        assert "GET" in preflight.headers["allow"]
