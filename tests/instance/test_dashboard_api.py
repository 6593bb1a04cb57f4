"""What the dashboard needs of the instance's API, on a real instance: values as they were
sent, renaming devices, changing and muting alert rules, and changes made with the session
cookie only together with that session's CSRF token. Everything real: the control plane, the
instance, Postgres, NATS and Mosquitto.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from test_instance import (  # noqa: F401 - client is a fixture
    PASSWORD,
    Customer,
    client,
    customer,
    device_client,
    reading,
    register,
)

from contracts import SubscriptionActivated
from libs.http.errors import InvalidRequest
from libs.servers.mosquitto import EmbeddedMosquitto
from services.instance.alerts.rules import parse_rule
from support import eventually

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def henry(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "henry@example.com")
    yield found
    await found.api.aclose()


@pytest.fixture(scope="module")
async def ida(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "ida@example.com")
    yield found
    await found.api.aclose()


async def publish(broker: EmbeddedMosquitto, device: dict[str, Any], **values: Any) -> None:
    async with device_client(broker, device) as mqtt:
        await mqtt.publish(device["mqtt"]["topics"]["readings"], reading(**values), qos=1)


async def test_values_come_back_as_they_were_sent(henry, broker) -> None:
    device = await register(henry, "values")
    sent = {"temperature": 40.2, "humidity": 45.3, "pressure": 1013.7, "gas_resistance": 123456.7}
    await publish(
        broker, device, iaq=42.1, co2_equivalent=612.3, breath_voc_equivalent=0.81, **sent
    )
    sent |= {"iaq": 42.1, "co2_equivalent": 612.3, "breath_voc_equivalent": 0.81}
    path = f"/api/devices/{device['device_id']}"
    shown = await eventually(
        lambda: henry.api.get(path), lambda r: r.json()["latest"] is not None, what="stored"
    )
    latest = shown.json()["latest"]
    assert {k: latest[k] for k in sent} == sent  # exactly: 40.2, not 40.20000076293945
    assert latest["iaq_accuracy"] == 3
    minute = (await henry.api.get(f"{path}/readings", params={"bucket": "1m"})).json()
    month = await henry.api.get(
        f"{path}/readings",
        params={"bucket": "1d", "from": (datetime.now(UTC) - timedelta(days=30)).isoformat()},
    )
    assert month.json()["source"] == "rollups"
    for answer in (minute, month.json()):
        for metric, value in sent.items():
            point = answer["series"][metric][0]
            assert (point["avg"], point["min"], point["max"]) == (value, value, value), metric
    exported = (await henry.api.get(f"{path}/readings.csv")).text
    row = next(csv.DictReader(io.StringIO(exported)))
    assert {k: row[k] for k in sent} == {k: str(v) for k, v in sent.items()}
    assert row["iaq_accuracy"] == "3"


async def test_a_device_is_renamed_with_its_name_checked(henry, ida) -> None:
    device = await register(henry, "old name")
    path = f"/api/devices/{device['device_id']}"
    renamed = await henry.api.patch(path, json={"name": "  Boiler room  "})
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["name"] == "Boiler room"
    assert (await henry.api.get(path)).json()["name"] == "Boiler room"
    for body, field in (
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "a\nb"}, "name"),
        ({"name": "ok", "colour": "red"}, "colour"),
        ([], "body"),
    ):
        refused = await henry.api.patch(path, json=body)
        assert refused.status_code == 400, (body, refused.text)
        assert field in [f["field"] for f in refused.json()["error"]["fields"]], refused.text
    assert (await henry.api.patch("/api/devices/nosuchdevice", json={"name": "x"})).status_code == (
        404
    )
    # Another customer's session on this instance finds nothing to rename.
    async with httpx.AsyncClient(base_url=str(henry.api.base_url), headers=ida.auth) as other:
        assert (await other.patch(path, json={"name": "mine now"})).status_code == 404
    assert (await henry.api.delete(path)).status_code == 204
    assert (await henry.api.patch(path, json={"name": "back"})).status_code == 404


async def _firings(c: Customer, rule_id: str) -> int:
    history = (await c.api.get("/api/alerts/history")).json()["history"]
    return sum(1 for h in history if h["rule_id"] == rule_id and h["event"] == "firing")


async def test_a_rule_is_changed_and_a_muted_rule_neither_fires_nor_notifies(henry, broker) -> None:
    device = await register(henry, "greenhouse")
    created = await henry.api.post(
        "/api/alerts/rules",
        json={
            "metric": "temperature",
            "operator": ">",
            "threshold": 30,
            "devices": [device["device_id"]],
        },
    )
    assert created.status_code == 201, created.text
    rule = created.json()["rule_id"]
    path = f"/api/alerts/rules/{rule}"
    # Muted before anything is sent: a hot reading fires nothing.
    muted = await henry.api.patch(path, json={"muted": True})
    assert muted.status_code == 200 and muted.json()["muted"] is True, muted.text
    assert "webhook_secret" not in muted.json()
    await publish(broker, device, temperature=35.0)
    await asyncio.sleep(6)  # three passes of the alert loop
    assert await _firings(henry, rule) == 0
    listed = (await henry.api.get("/api/alerts/rules")).json()["rules"]
    assert next(r for r in listed if r["rule_id"] == rule)["muted"] is True
    # Unmuted, it fires on the same reading.
    assert (await henry.api.patch(path, json={"muted": False})).status_code == 200
    await eventually(lambda: _firings(henry, rule), lambda n: n == 1, what="the rule firing")
    # Its condition changed: the state starts again, and 35 is no longer over 40.
    changed = await henry.api.patch(path, json={"threshold": 40, "name": "Too hot"})
    assert changed.status_code == 200, changed.text
    assert changed.json()["threshold"] == 40 and changed.json()["name"] == "Too hot"
    assert changed.json()["operator"] == ">" and changed.json()["devices"] == [device["device_id"]]
    history = (await henry.api.get("/api/alerts/history")).json()["history"]
    closed = [h for h in history if h["rule_id"] == rule and h["event"] == "resolved"]
    assert len(closed) == 1 and "changed or muted" in closed[0]["message"], history
    await asyncio.sleep(4)
    rules = (await henry.api.get("/api/alerts/rules")).json()["rules"]
    assert not next(r for r in rules if r["rule_id"] == rule)["states"]
    assert await _firings(henry, rule) == 1
    # Webhooks are not in the starter plan, added by a change either.
    hooked = await henry.api.patch(path, json={"webhook_url": "http://127.0.0.1:9/hook"})
    assert hooked.status_code == 403, hooked.text
    assert "webhooks" in hooked.json()["error"]["message"]


async def test_a_rule_change_is_checked_field_by_field(henry, ida) -> None:
    created = await henry.api.post(
        "/api/alerts/rules", json={"metric": "humidity", "operator": "<", "threshold": 20}
    )
    path = f"/api/alerts/rules/{created.json()['rule_id']}"
    for body, field in (
        ({"operator": "!="}, "operator"),
        ({"threshold": "high"}, "threshold"),
        ({"metric": "colour"}, "metric"),
        ({"for_seconds": -1}, "for_seconds"),
        ({"muted": "yes"}, "muted"),
        ({"devices": "all"}, "devices"),
        ({"name": "x" * 101}, "name"),
        ({"secret": "mine"}, "secret"),
    ):
        refused = await henry.api.patch(path, json=body)
        assert refused.status_code == 400, (body, refused.text)
        assert field in [f["field"] for f in refused.json()["error"]["fields"]], refused.text
    for huge in (b'{"threshold": 1e999}', b'{"threshold": 1' + b"0" * 400 + b"}"):
        refused = await henry.api.patch(
            path, content=huge, headers={"Content-Type": "application/json"}
        )
        assert refused.status_code == 400, refused.text
        # Refused as it is read (no number that large is JSON we take), or by the rule's check.
        assert refused.json()["error"]["fields"][0]["field"] in ("body", "threshold")
    # Nothing of the refused changes was kept.
    rules = (await henry.api.get("/api/alerts/rules")).json()["rules"]
    kept = next(r for r in rules if path.endswith(r["rule_id"]))
    assert (kept["operator"], kept["threshold"], kept["muted"]) == ("<", 20, False)
    assert (await henry.api.patch("/api/alerts/rules/nosuchrule", json={})).status_code == 404
    async with httpx.AsyncClient(base_url=str(henry.api.base_url), headers=ida.auth) as other:
        assert (await other.patch(path, json={"muted": True})).status_code == 404
    assert (await henry.api.delete(path)).status_code == 204
    assert (await henry.api.patch(path, json={"muted": True})).status_code == 404


async def signed_in(base: str, email: str) -> tuple[httpx.AsyncClient, str]:
    """A browser's session on the instance's dashboard: its cookie, and its CSRF token."""
    browser = httpx.AsyncClient(base_url=base, timeout=10)
    answer = await browser.post("/dashboard/login", json={"email": email, "password": PASSWORD})
    assert answer.status_code == 200, answer.text
    return browser, answer.json()["csrf_token"]


async def test_a_cookie_changes_things_only_with_its_sessions_csrf_token(henry) -> None:
    base = str(henry.api.base_url)
    first, token = await signed_in(base, "henry@example.com")
    second, other_token = await signed_in(base, "henry@example.com")
    try:
        assert token != other_token
        # The page reads its token back after a reload.
        session = await first.get("/dashboard/session")
        assert session.json() == {"csrf_token": token}
        assert (await first.get("/api/devices")).status_code == 200  # reading needs none
        body = {"name": "by cookie"}
        missing = await first.post("/api/devices", json=body)
        assert missing.status_code == 403
        assert "X-CSRF-Token" in missing.json()["error"]["message"]
        for wrong in (other_token, "0" * 64, "x"):
            refused = await first.post("/api/devices", json=body, headers={"X-CSRF-Token": wrong})
            assert refused.status_code == 403
            assert "does not belong to this session" in refused.json()["error"]["message"]
        made = await first.post("/api/devices", json=body, headers={"X-CSRF-Token": token})
        assert made.status_code == 201, made.text
        path = f"/api/devices/{made.json()['device_id']}"
        assert (await first.patch(path, json={"name": "x"})).status_code == 403
        assert (await first.delete(path)).status_code == 403
        assert (await first.delete(path, headers={"X-CSRF-Token": other_token})).status_code == 403
        assert (await second.delete(path, headers={"X-CSRF-Token": other_token})).status_code == 204
    finally:
        await first.aclose()
        await second.aclose()
    # A bearer-token client needs no CSRF token.
    assert (await henry.api.post("/api/devices", json={"name": "by token"})).status_code == 201
    # Without a session there is no token to get.
    async with httpx.AsyncClient(base_url=base) as anonymous:
        assert (await anonymous.get("/dashboard/session")).status_code == 401


async def test_a_webhook_added_by_a_change_gets_a_secret_shown_once(henry, store) -> None:
    await store.publish(
        SubscriptionActivated(
            customer_id=henry.id,
            plan="professional",
            status="active",
            stripe_customer_id="cus_henry",
            stripe_subscription_id="sub_henry",
        ),
        customer_id=henry.id,
    )
    await eventually(
        lambda: henry.api.get("/api/license"),
        lambda r: r.json().get("plan") == "professional",
        timeout=60,
        what="the professional license on the instance",
    )
    created = await henry.api.post("/api/alerts/rules", json={"metric": "no_data"})
    assert created.json()["webhook_secret"] is None
    path = f"/api/alerts/rules/{created.json()['rule_id']}"
    for url in ("ftp://example.com", "http://10.1.2.3/hook", "https://[::1"):
        refused = await henry.api.patch(path, json={"webhook_url": url})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["fields"][0]["field"] == "webhook_url"
    hooked = await henry.api.patch(path, json={"webhook_url": "http://127.0.0.1:9/hook"})
    assert hooked.status_code == 200, hooked.text
    secret = hooked.json()["webhook_secret"]
    assert len(secret) > 30
    renamed = await henry.api.patch(path, json={"name": "Silent sensor"})
    assert "webhook_secret" not in renamed.json()
    assert renamed.json()["webhook_url"] == "http://127.0.0.1:9/hook"
    assert "secret" not in str((await henry.api.get("/api/alerts/rules")).json())
    moved = await henry.api.patch(path, json={"webhook_url": "http://127.0.0.2:9/hook"})
    assert moved.json()["webhook_secret"] not in (None, secret)
    removed = await henry.api.patch(path, json={"webhook_url": None})
    assert removed.status_code == 200 and removed.json()["webhook_url"] is None


async def test_a_rule_threshold_must_be_finite() -> None:
    for threshold in (float("inf"), float("nan"), 10**400):
        with pytest.raises(InvalidRequest) as bad:
            await parse_rule({"metric": "iaq", "operator": ">", "threshold": threshold}, False)
        assert bad.value.fields == [{"field": "threshold", "reason": "must be a finite number"}]


def test_the_control_planes_refusals_of_a_sign_in_read_plainly() -> None:
    """What the dashboard tells a browser for each answer of the control plane to a relayed
    sign-in (a closed account is not a fault of the control plane)."""
    import httpx

    from libs.http.errors import TooManyRequests, Unauthorized, UpstreamError
    from services.instance.api.dashboard import session_token

    closed = httpx.Response(403, json={"error": {"code": "account_closed", "message": "closed"}})
    with pytest.raises(Unauthorized, match="this account is closed"):
        session_token(closed, "c1")
    with pytest.raises(Unauthorized, match="wrong email or password"):
        session_token(httpx.Response(401, json={}), "c1")
    with pytest.raises(TooManyRequests):
        session_token(httpx.Response(429, headers={"retry-after": "30"}), "c1")
    for odd in (
        httpx.Response(403, json=[1]),
        httpx.Response(403, text="<html>"),
        httpx.Response(500),
    ):
        with pytest.raises(UpstreamError):
            session_token(odd, "c1")
    with pytest.raises(Unauthorized, match="another account"):
        session_token(httpx.Response(200, json={"customer_id": "c2", "token": "t"}), "c1")
    assert session_token(httpx.Response(200, json={"customer_id": "c1", "token": "t"}), "c1") == "t"
