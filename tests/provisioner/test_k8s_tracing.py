"""The kubernetes backend hands the deploy's trace to the instance pod it starts, and where its
spans go, without rolling instances for a trace id: calls checked against the STAND-IN of the
API server (tests/k8s_standin.py; no API server can run here), manifests against the real
Kubernetes schemas (offline, kubernetes-validate)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import kubernetes_validate
import pytest
from k8s_standin import KubeStandIn, api_client_for, backend_running, served, starter_spec

from contracts import TraceContext
from libs.config import load_settings
from libs.observability.telemetry import continuing
from services.provisioner.app import kubernetes_settings
from services.provisioner.backends.base import BackendError, InstanceSpec
from services.provisioner.backends.kubernetes.backend import KubernetesBackend
from services.provisioner.backends.kubernetes.manifests.render import render
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings
from services.provisioner.backends.kubernetes.trace import trace_config
from services.provisioner.settings import ProvisionerSettings

CUSTOMER = "3c59dc04-8e8a-4f2b-9d1c-5f6a7b8c9d0e"
NS = f"customer-{CUSTOMER}"
K8S_VERSION = "1.37.0"
DEPLOY = TraceContext(traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
UPDATE = TraceContext(
    traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    tracestate="vendor=opaque",
)
DEPLOYMENT = f"/apis/apps/v1/namespaces/{NS}/deployments/instance"
CONFIGMAP = f"/api/v1/namespaces/{NS}/configmaps/instance-trace"


def spec(license_id: str = "lic-1") -> InstanceSpec:
    return starter_spec(CUSTOMER, license_id=license_id, license_jwt=f"h.c.{license_id}")


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[KubeStandIn, str]]:
    standin = KubeStandIn()
    async with served(standin) as url:
        yield standin, url


def backend_for(url: str, settings: KubernetesSettings | None = None) -> KubernetesBackend:
    return KubernetesBackend(
        settings or KubernetesSettings(),
        b"k" * 40,
        api_client_for(url),
        ready_timeout=20,
        poll_seconds=0.05,
    )


def applied(standin: KubeStandIn) -> list[dict[str, Any]]:
    return [r for r in standin.requests if r["method"] == "PATCH"]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    [found] = deployment["spec"]["template"]["spec"]["containers"]
    return dict(found)


async def test_a_deploy_hands_its_trace_to_the_pod_it_starts_then_takes_it_back(cluster) -> None:
    standin, url = cluster
    backend = backend_for(url)
    async with backend_running(backend):
        with continuing(DEPLOY):
            await backend.deploy(spec(), lambda *_: _nothing())
    patches = applied(standin)
    paths = [p["path"] for p in patches]
    # Right before the Deployment: the pod it creates reads it as it starts.
    handed = paths.index(CONFIGMAP)
    assert paths[handed + 1] == DEPLOYMENT
    assert patches[handed]["body"]["data"] == {"traceparent": DEPLOY.traceparent}
    # Once the instance is ready it is emptied: a pod restarted later starts its own trace.
    assert paths.count(CONFIGMAP) == 2
    assert standin.objects[CONFIGMAP]["data"] == {}
    # The pod reads it by reference, optionally; no trace id is in the template.
    env = {e["name"]: e for e in container(standin.objects[DEPLOYMENT])["env"]}
    assert env["TRACEPARENT"]["valueFrom"] == {
        "configMapKeyRef": {"name": "instance-trace", "key": "traceparent", "optional": True}
    }
    assert env["TRACESTATE"]["valueFrom"]["configMapKeyRef"]["key"] == "tracestate"
    assert "4bf92f3577b34da6a3ce929d0e0e4736" not in str(standin.objects[DEPLOYMENT])


async def test_a_deploy_that_never_gets_ready_takes_its_trace_back_all_the_same(cluster) -> None:
    standin, url = cluster
    standin.unready.add("instance")  # its pod crash-loops: the deploy fails waiting for it
    backend = KubernetesBackend(
        KubernetesSettings(), b"k" * 40, api_client_for(url), ready_timeout=0.5, poll_seconds=0.05
    )
    async with backend_running(backend):
        with continuing(DEPLOY), pytest.raises(BackendError, match="not ready"):
            await backend.deploy(spec(), lambda *_: _nothing())
    # A pod that starts later (a retry, a restart) must not join the failed attempt's trace.
    assert standin.objects[CONFIGMAP]["data"] == {}


async def test_another_trace_rolls_nothing_and_changes_no_manifest_digest(cluster) -> None:
    standin, url = cluster
    backend = backend_for(url)
    async with backend_running(backend):
        with continuing(DEPLOY):
            await backend.deploy(spec(), lambda *_: _nothing())
        generation = standin.objects[DEPLOYMENT]["metadata"]["generation"]
        digest = backend.manifest_digest(spec())
        # The same manifests again in another job's trace: the Deployment does not roll.
        with continuing(UPDATE):
            await backend.deploy(spec(), lambda *_: _nothing())
        assert standin.objects[DEPLOYMENT]["metadata"]["generation"] == generation
        with continuing(UPDATE):
            assert backend.manifest_digest(spec()) == digest
        # A new license rolls it, and its new pod gets the update's trace.
        before = len(standin.requests)
        with continuing(UPDATE):
            await backend.update(spec("lic-2"), lambda *_: _nothing())
    assert standin.objects[DEPLOYMENT]["metadata"]["generation"] == generation + 1
    handed = [
        r["body"]["data"]
        for r in standin.requests[before:]
        if r["method"] == "PATCH" and r["path"] == CONFIGMAP
    ]
    assert handed == [{"traceparent": UPDATE.traceparent, "tracestate": "vendor=opaque"}, {}]


async def test_without_a_span_nothing_is_handed(cluster) -> None:
    standin, url = cluster
    async with backend_running(backend_for(url)) as backend:
        await backend.deploy(spec(), lambda *_: _nothing())
    assert CONFIGMAP not in [p["path"] for p in applied(standin)]


def test_instances_export_where_the_provisioner_says_and_may_reach_the_collector() -> None:
    settings = load_settings(
        ProvisionerSettings,
        {
            "OTEL_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability.svc:4318",
            "KUBERNETES_OTLP_COLLECTOR_NAMESPACE": "observability",
        },
    )
    rendered = render(spec(), kubernetes_settings(settings), "x")
    objects = {(o["kind"], o["metadata"]["name"]): o for o in rendered}
    env = {e["name"]: e.get("value") for e in container(objects[("Deployment", "instance")])["env"]}
    assert env["OTEL_EXPORTER"] == "otlp"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4318"
    egress = objects[("NetworkPolicy", "instance-egress")]["spec"]["egress"]
    assert {
        "to": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}
        ],
        "ports": [{"protocol": "TCP", "port": 4318}],
    } in egress
    for obj in (*rendered, trace_config(NS, CUSTOMER, {"TRACEPARENT": DEPLOY.traceparent or ""})):
        if obj["kind"] not in ("HTTPRoute", "BackendTrafficPolicy"):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_instances_own_settings_win_and_without_any_spans_go_nowhere() -> None:
    own = kubernetes_settings(
        load_settings(
            ProvisionerSettings,
            {
                "OTEL_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                "INSTANCE_OTEL_EXPORTER": "otlp",
                "INSTANCE_OTLP_ENDPOINT": "https://otlp.example.com",
            },
        )
    )
    assert (own.otel_exporter, own.otlp_endpoint) == ("otlp", "https://otlp.example.com")
    # Outside the cluster: reached as public HTTPS is, no rule of its own.
    egress = render(spec(), own, "x")
    policy = next(o for o in egress if o["metadata"]["name"] == "instance-egress")
    assert len(policy["spec"]["egress"]) == 2
    default = kubernetes_settings(load_settings(ProvisionerSettings, {}))
    env = {
        e["name"]: e.get("value")
        for e in container(
            next(o for o in render(spec(), default, "x") if o["kind"] == "Deployment")
        )["env"]
    }
    assert env["OTEL_EXPORTER"] == "none"
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env


async def _nothing() -> None:
    return None
