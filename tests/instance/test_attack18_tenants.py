"""A malicious tenant on the routes of issue 18: another customer's session on every one of
them gets 404 (nothing about the instance, nothing changed), and odd query parameters on the
quota routes are a 400 naming the parameter, never a 500. Real control plane, instances,
Postgres, NATS and Mosquitto.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from test_instance import (  # noqa: F401 - client is a fixture
    Customer,
    client,
    customer,
    instance_database,
    register,
)
from test_integrations_api import upgrade

from services.instance.integrations.store import NewIntegration, create_integration

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def rosa(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "rosa@example.com")
    yield found
    await found.api.aclose()


@pytest.fixture(scope="module")
async def sven(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "sven@example.com")
    yield found
    await found.api.aclose()


async def test_another_customers_session_finds_nothing_on_the_new_routes(
    rosa: Customer, sven: Customer, store, postgres_server_url: str
) -> None:
    await upgrade(rosa, store)
    device = (await register(rosa, "lab"))["device_id"]
    async with instance_database(postgres_server_url, rosa) as conn:
        made = await create_integration(
            conn,
            NewIntegration(name="wh", url="https://hooks.example.com/x", kinds=["readings"]),
            datetime.now(UTC),
        )
    integration = made["integration_id"]
    rule = (await rosa.api.get("/api/alerts/rules")).json()["rules"][0]
    before = {
        path: (await rosa.api.get(path)).json()
        for path in ("/api/integrations", "/api/alerts/rules", "/api/devices")
    }
    calls = [
        ("GET", f"/api/devices/{device}/calibration", None),
        ("GET", "/api/quotas", None),
        ("GET", "/api/quotas/limited", None),
        ("PUT", f"/api/alerts/rules/{rule['rule_id']}", {"enabled": False}),
        ("GET", "/api/integrations", None),
        ("PUT", f"/api/integrations/{integration}", {"name": "mine"}),
        ("DELETE", f"/api/integrations/{integration}", None),
        ("POST", f"/api/integrations/{integration}/backfills", {"from": "2026-01-01T00:00:00Z"}),
        ("GET", f"/api/integrations/{integration}/backfills", None),
        ("GET", "/api/export", None),
        ("POST", "/api/import", None),
        ("POST", f"/api/devices/{device}/credentials", None),
    ]
    for method, path, body in calls:
        answer = await sven.api.request(method, rosa.api.base_url.join(path), json=body)
        assert answer.status_code == 404, (method, path, answer.status_code, answer.text)
        assert device not in answer.text and integration not in answer.text
    after = {path: (await rosa.api.get(path)).json() for path in before}
    assert after == before


@pytest.mark.parametrize(
    "query",
    ["hours=0", "hours=-1", "hours=99999999999999999999", "hours=NaN", "hours="],
)
async def test_odd_quota_parameters_are_refused_naming_them(rosa: Customer, query: str) -> None:
    answer = await rosa.api.get(f"/api/quotas/limited?{query}")
    assert answer.status_code == 400, answer.text
    assert "hours" in answer.text
