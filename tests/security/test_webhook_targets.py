"""Alert webhooks may not lead into the platform's own network (SSRF).

Issue 11: on the local backend a customer's alert webhook could point at loopback, private or
link-local addresses (the control plane, the cloud's metadata service) and the instance POSTed
there. Now a webhook's host is resolved and every address is checked when the rule is made
(400 naming ``webhook_url``) and again at delivery, which goes to an address just checked.
Real instances, a real receiver, real HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from litestar import Litestar, Request, post
from tenant_instances import Tenant, control_plane, device_client, reading, register, sign_up

from contracts import SubscriptionActivated
from libs.config import ServiceSettings
from libs.eventstore import EventStore
from libs.mqtt_broker import EmbeddedMosquitto
from services.provisioner.backends.local import instance_name
from support import eventually, serving, with_database

pytestmark = pytest.mark.slow

REFUSED = [
    "http://127.0.0.1:8080/api/queue/stats",
    "http://localhost:8080/",
    "http://10.0.0.7/hook",
    "http://172.20.1.1/hook",
    "http://192.168.1.1/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]:8080/",
    "http://[::ffff:127.0.0.1]:8080/",
    "http://[fe80::1]/",
    "http://0.0.0.0:8080/",
    "http://2130706433:8080/",  # 127.0.0.1 as one number
    "http://127.1:8080/",
    "https://224.0.0.1/",
    "http://100.64.0.1/",
]


@pytest.fixture(scope="module")
async def client(
    settings: ServiceSettings,
    store: EventStore,
    broker: EmbeddedMosquitto,
    port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[httpx.AsyncClient]:
    async with control_plane(settings, broker, port, tmp_path_factory.mktemp("tenants")) as http:
        yield http


@pytest.fixture(scope="module")
async def grace(client: httpx.AsyncClient, store: EventStore) -> AsyncIterator[Tenant]:
    """A professional customer: her license includes webhooks."""
    tenant = await sign_up(client, "grace@example.com")
    await store.publish(
        SubscriptionActivated(
            customer_id=tenant.id,
            plan="professional",
            status="active",
            stripe_customer_id="cus_grace",
            stripe_subscription_id="sub_grace",
        ),
        customer_id=tenant.id,
    )
    await eventually(
        lambda: tenant.api.get("/api/license"),
        lambda r: r.json().get("features", {}).get("webhooks") is True,
        timeout=60,
        what="the professional license on the instance",
    )
    yield tenant
    await tenant.api.aclose()


def rule(url: str) -> dict[str, Any]:
    return {"metric": "temperature", "operator": ">", "threshold": 30, "webhook_url": url}


async def test_a_webhook_into_the_platforms_network_is_refused_at_creation(grace) -> None:
    for url in REFUSED:
        answer = await grace.api.post("/api/alerts/rules", json=rule(url))
        assert answer.status_code == 400, f"{url}: {answer.status_code} {answer.text}"
        fields = answer.json()["error"]["fields"]
        assert fields[0]["field"] == "webhook_url", url
        assert "public addresses" in fields[0]["reason"], url
    unknown = await grace.api.post("/api/alerts/rules", json=rule("http://nowhere.invalid/"))
    assert unknown.status_code == 400
    assert "does not resolve" in unknown.json()["error"]["fields"][0]["reason"]
    listed = (await grace.api.get("/api/alerts/rules")).json()["rules"]
    assert [r for r in listed if r["webhook_url"]] == []
    # A public address is taken (nothing is sent until an alert fires).
    public = await grace.api.post("/api/alerts/rules", json=rule("https://93.184.216.34/hook"))
    assert public.status_code == 201, public.text


async def test_a_webhook_into_the_platforms_network_is_refused_at_delivery(
    grace, broker, postgres_server_url
) -> None:
    """Rules made before the check existed, or while a name still resolved elsewhere, reach
    delivery with a loopback target: the POST is not sent."""
    received: list[str] = []

    @post("/hook", status_code=200)
    async def hook(request: Request[Any, Any, Any]) -> dict[str, bool]:
        received.append((await request.body()).decode())
        return {"ok": True}

    async with serving(Litestar([hook], debug=False)) as receiver:
        port = receiver.base_url.port
        device = await register(grace, "greenhouse")
        conn = await asyncpg.connect(
            with_database(postgres_server_url, instance_name(grace.id)),
            server_settings={"search_path": "instance"},
        )
        try:
            for index, host in enumerate(("127.0.0.1", "localhost")):
                await conn.execute(
                    "INSERT INTO alert_rules (rule_id, name, metric, operator, threshold, "
                    "for_seconds, devices, webhook_url, webhook_secret, created_at) "
                    "VALUES ($1, 'too hot', 'temperature', '>', 30, 0, $2, $3, 's', $4)",
                    f"old-{index}",
                    [device["device_id"]],
                    f"http://{host}:{port}/hook",
                    datetime.now(UTC),
                )
            async with device_client(broker, device) as mqtt:
                await mqtt.publish(
                    device["mqtt"]["topics"]["readings"], reading(temperature=35.0), qos=1
                )
            tried = await eventually(
                lambda: conn.fetch(
                    "SELECT url, attempts, last_error FROM webhook_deliveries "
                    "WHERE rule_id LIKE 'old-%' AND attempts > 0"
                ),
                lambda rows: len(rows) == 2,
                timeout=30,
                what="both deliveries tried",
            )
        finally:
            await conn.close()
    assert received == []
    for row in tried:
        assert row["last_error"].startswith("refused:"), dict(row)
        assert "loopback" in row["last_error"]
