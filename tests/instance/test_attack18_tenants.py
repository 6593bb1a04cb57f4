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
from support import eventually

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


@pytest.mark.parametrize(
    "body",
    [
        {"from": "0001-01-01T00:00:00Z", "to": "9999-12-31T23:59:59Z"},
        {"from": "0001-01-01T00:00:00+14:00", "to": "2026-01-01T00:00:00Z"},
        {"from": "2026-01-01T00:00:00Z", "to": "9999-12-31T23:59:59-14:00"},
        {"from": "2026-02-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
        {"from": "2026-01-01T00:00:00Z", "to": "2026-02-01T00:00:00Z", "rate": 10**30},
        {"from": "2026-01-01T00:00:00Z", "to": "2026-02-01T00:00:00Z", "rate": 1.5},
        {"from": "2026-01-01T00:00:00Z", "to": "2026-02-01T00:00:00Z", "rate": -1},
        {"from": 1, "to": None},
        {"from": "2026-01-01", "to": "2026-02-01"},
        [],
    ],
)
async def test_absurd_backfills_are_refused_or_run_never_a_500(
    rosa: Customer, body: object, postgres_server_url: str
) -> None:
    async with instance_database(postgres_server_url, rosa) as conn:
        integration = await conn.fetchval("SELECT integration_id FROM integrations LIMIT 1")
    path = f"/api/integrations/{integration}/backfills"
    answer = await rosa.api.post(path, json=body)
    assert answer.status_code in {200, 201, 400, 409}, answer.text
    if answer.status_code == 400:
        assert answer.json()["error"]["fields"], answer.text
    listed = await rosa.api.get(path)
    assert listed.status_code == 200, listed.text
    for backfill in listed.json()["backfills"]:
        one = await rosa.api.get(f"{path}/{backfill['backfill_id']}")
        assert one.status_code == 200, one.text


async def test_a_backfill_over_all_of_time_finishes(
    rosa: Customer, postgres_server_url: str
) -> None:
    async with instance_database(postgres_server_url, rosa) as conn:
        integration = await conn.fetchval("SELECT integration_id FROM integrations LIMIT 1")
    path = f"/api/integrations/{integration}/backfills"
    for backfill in (await rosa.api.get(path)).json()["backfills"]:
        await rosa.api.delete(f"{path}/{backfill['backfill_id']}")
    made = await rosa.api.post(
        path, json={"from": "0001-01-01T00:00:00Z", "to": "9999-12-31T23:59:59Z"}
    )
    assert made.status_code == 201, made.text
    one = f"{path}/{made.json()['backfill_id']}"
    done = await eventually(
        lambda: rosa.api.get(one),
        lambda r: r.json()["state"] not in {"queued", "running"},
        timeout=60,
        what="the backfill over all of time",
    )
    assert done.json()["state"] == "done", done.text


HOSTILE_RULES: list[str] = [
    '{"params": {"minutes": NaN}}',
    '{"params": {"minutes": Infinity}}',
    '{"params": {"minutes": -1}}',
    '{"params": {"minutes": 1e400}}',
    '{"params": {"minutes": 100000000000000000000000000000000000000}}',
    '{"params": {"minutes": "30"}}',
    '{"params": {"minutes": true}}',
    '{"params": [1]}',
    '{"params": {"": 1}}',
    '{"threshold": 1e400}',
    '{"threshold": NaN}',
    '{"muted": "yes"}',
    '{"name": 5}',
    '{"devices": [1, {}]}',
    '{"enabled": null}',
    "[]",
    "null",
    "1",
    '{"params": {"minutes": 30}, "params": {"minutes": 31}}',
]


@pytest.mark.parametrize("body", HOSTILE_RULES)
async def test_hostile_rule_changes_are_never_a_500_and_leave_params_finite(
    rosa: Customer, body: str
) -> None:
    rules = (await rosa.api.get("/api/alerts/rules")).json()["rules"]
    for rule in rules:
        answer = await rosa.api.put(
            f"/api/alerts/rules/{rule['rule_id']}",
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert answer.status_code < 500, (rule, answer.text)
        if answer.status_code == 400:
            assert "traceback" not in answer.text.lower()
    for rule in (await rosa.api.get("/api/alerts/rules")).json()["rules"]:
        for value in (rule.get("params") or {}).values():
            assert value is None or (isinstance(value, int | float) and value == value)
