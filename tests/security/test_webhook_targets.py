"""Alert webhooks may not lead into the platform's own network (SSRF).

Issue 11: on the local backend a customer's alert webhook could point at loopback, private or
link-local addresses (the control plane, the cloud's metadata service) and the instance POSTed
there; on Kubernetes the instance egress policy blocked every external webhook while allowing
all of the control plane's namespace. Now a webhook's host is resolved and every address is
checked when the rule is made (400 naming ``webhook_url``) and again at delivery, which goes to
an address just checked; the Kubernetes policy lets instances out to the control plane's HTTP
port and the public internet only. Real instances, a real receiver, real HTTP.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import kubernetes_validate
import pytest
from litestar import Litestar, Request, post
from tenant_instances import Tenant, device_client, reading, register, sign_up

from contracts import SubscriptionActivated
from libs.eventlog.store import EventStore
from services.provisioner.backends.base import InstanceSpec
from services.provisioner.backends.kubernetes.manifests.render import render
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings
from services.provisioner.backends.local.backend import instance_name
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
    # Port 0 is a port (no service listens there), not a missing one that means 80.
    answer = await grace.api.post("/api/alerts/rules", json=rule("http://8.8.8.8:0/"))
    assert answer.status_code == 400
    assert answer.json()["error"]["fields"][0]["reason"] == "has a port that is not from 1 to 65535"
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


def _egress_rules(settings: KubernetesSettings) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod selector, egress rule) of every NetworkPolicy rendered for a customer."""
    spec = InstanceSpec(
        customer_id="8f14e45f-ceea-4e7a-9c3b-2d1f0a6b7c11",
        plan="starter",
        license_jwt="header.claims.signature",
        license_id="lic-1",
        jwks_url="http://licensing.iotistic.svc/.well-known/jwks.json",
    )
    policies = [o for o in render(spec, settings, "p" * 32) if o["kind"] == "NetworkPolicy"]
    for policy in policies:
        kubernetes_validate.validate(policy, "1.37.0", strict=True)
    return [
        (policy["spec"]["podSelector"], rule)
        for policy in policies
        for rule in policy["spec"].get("egress", [])
    ]


def _excepted(rules: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[Any]:
    blocks = [peer["ipBlock"] for _, rule in rules for peer in rule["to"] if "ipBlock" in peer]
    # Everything, and the IPv6 prefixes that carry IPv4 addresses (NAT64, 6to4), which are
    # excepted from ::/0 and open only as far as the address they carry is public.
    assert {b["cidr"] for b in blocks} == {"0.0.0.0/0", "::/0", "64:ff9b::/96", "2002::/16"}
    wide = [b for b in blocks if b["cidr"] in ("0.0.0.0/0", "::/0")]
    return [ipaddress.ip_network(e) for b in wide for e in b["except"]]


def test_the_kubernetes_egress_lets_instances_reach_only_public_addresses_and_the_api() -> None:
    settings = KubernetesSettings()
    rules = _egress_rules(settings)
    instance = {"matchLabels": {"app.kubernetes.io/name": "instance"}}
    control_plane = {"kubernetes.io/metadata.name": settings.control_plane_namespace}
    to_control_plane = [
        (selector, rule)
        for selector, rule in rules
        for peer in rule["to"]
        if peer.get("namespaceSelector", {}).get("matchLabels") == control_plane
    ]
    # Only the instance reaches the control plane: its HTTP pods, on their port only (not
    # NATS, not Postgres).
    assert len(to_control_plane) == 1, to_control_plane
    selector, only = to_control_plane[0]
    assert selector == instance
    assert only["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert only["to"][0]["podSelector"] == {
        "matchLabels": {"app.kubernetes.io/name": "iotistic"},
        "matchExpressions": [
            {
                "key": "app.kubernetes.io/component",
                "operator": "In",
                "values": ["signup", "billing", "licensing"],
            }
        ],
    }
    # The public internet (webhooks), without anything private, loopback or link-local.
    excepted = _excepted([(s, r) for s, r in rules if s == instance])
    for address in ("10.0.0.1", "172.16.5.4", "192.168.0.1", "127.0.0.1", "169.254.169.254"):
        assert any(ipaddress.ip_address(address) in net for net in excepted), address
    for address in ("::1", "fe80::1", "fd00::5", "::ffff:10.0.0.1"):
        assert any(ipaddress.ip_address(address) in net for net in excepted), address
    assert not any(ipaddress.ip_address("93.184.216.34") in net for net in excepted)
    # The other pods (Postgres, Mosquitto) reach their namespace and DNS only.
    for selector, rule in rules:
        if selector != instance:
            assert all("ipBlock" not in peer for peer in rule["to"]), rule
    # The cluster's own networks, where they are not private, are refused as well.
    clustered = KubernetesSettings(cluster_cidrs=("11.0.0.0/16", "2001:db8:42::/56"))
    excepted = _excepted([(s, r) for s, r in _egress_rules(clustered) if s == instance])
    for address in ("11.0.3.4", "2001:db8:42::9"):
        assert any(ipaddress.ip_address(address) in net for net in excepted), address
