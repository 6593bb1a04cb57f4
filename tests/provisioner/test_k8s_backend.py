"""The kubernetes backend: its manifests against the real Kubernetes schemas (offline, with
kubernetes-validate), and its calls against a STAND-IN of the API server (tests/k8s_standin.py),
since no API server can run here.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from k8s_standin import (
    STANDIN_TOKEN,
    KubeStandIn,
    api_client_for,
    backend_running,
    served,
    starter_spec,
)
from kubernetes_asyncio import client as k8s

from services.provisioner.backends.base import BackendError, InstanceHealth, InstanceSpec
from services.provisioner.backends.kubernetes.backend import KubernetesBackend
from services.provisioner.backends.kubernetes.credentials import customer_objects
from services.provisioner.backends.kubernetes.manifests.render import render, render_yaml
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings

CUSTOMER = "8f14e45f-ceea-4e7a-9c3b-2d1f0a6b7c11"
NS = f"customer-{CUSTOMER}"
K8S_VERSION = "1.37.0"
SECRET = b"k" * 40


def spec(license_id: str = "lic-1", jwt: str = "header.claims.signature-one") -> InstanceSpec:
    return starter_spec(CUSTOMER, license_id=license_id, license_jwt=jwt)


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[KubeStandIn, str]]:
    standin = KubeStandIn()
    async with served(standin) as url:
        yield standin, url


def backend_for(url: str, token: str = STANDIN_TOKEN) -> KubernetesBackend:
    return KubernetesBackend(
        KubernetesSettings(),
        SECRET,
        api_client_for(url, token),
        ready_timeout=20,
        poll_seconds=0.05,
    )


class Steps:
    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []

    async def __call__(self, percent: int, step: str) -> None:
        self.seen.append((percent, step))


def test_every_manifest_is_valid_against_the_kubernetes_schemas() -> None:
    objects = render(spec(), KubernetesSettings(storage_class="fast"), "p" * 64)
    for obj in objects:
        # The Gateway API's and Envoy Gateway's kinds are CRDs, outside these schemas: their
        # shape is checked in test_k8s_network.py.
        if obj["kind"] not in ("HTTPRoute", "BackendTrafficPolicy"):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    kinds = [o["kind"] for o in objects]
    assert kinds[0] == "Namespace"
    assert set(kinds) == {
        "Namespace",
        "ResourceQuota",
        "LimitRange",
        "NetworkPolicy",
        "Secret",
        "ConfigMap",
        "Service",
        "StatefulSet",
        "Deployment",
        "BackendTrafficPolicy",
        "HTTPRoute",
        "PersistentVolumeClaim",
        "CronJob",
    }


def test_a_broken_manifest_is_caught_by_the_schema_check() -> None:
    deployment = next(
        o for o in render(spec(), KubernetesSettings(), "p") if o["kind"] == "Deployment"
    )
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_the_manifests_say_what_the_design_asks() -> None:
    objects = render(spec(), KubernetesSettings(base_domain="example.io"), "secret-pw")
    assert objects == render(spec(), KubernetesSettings(base_domain="example.io"), "secret-pw")
    by = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert all(o["metadata"].get("namespace", NS) == NS for o in objects)
    quota = by[("ResourceQuota", "customer-quota")]["spec"]["hard"]
    assert (quota["limits.cpu"], quota["limits.memory"]) == ("4", "4Gi")
    postgres = by[("StatefulSet", "postgres")]["spec"]
    assert postgres["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    ports = {p["port"] for p in by[("Service", "mosquitto")]["spec"]["ports"]}
    assert ports == {1883, 9001}
    # The route on the shared Gateway; its TLS is the Gateway's wildcard certificate.
    route = by[("HTTPRoute", "instance")]
    assert route["spec"]["hostnames"] == [f"{CUSTOMER}.example.io"]
    assert "tls" not in route["spec"] and "annotations" not in route["metadata"]
    instance = by[("Deployment", "instance")]["spec"]["template"]
    assert instance["metadata"]["annotations"]["iotistic.io/license-id"] == "lic-1"
    container = instance["spec"]["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert by[("Secret", "license")]["stringData"]["license.jwt"] == spec().license_jwt
    broker = by[("StatefulSet", "mosquitto")]["spec"]
    init = broker["template"]["spec"]["initContainers"][0]
    assert "mosquitto_ctrl dynsec init" in init["command"][-1]
    assert broker["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "1Gi"
    conf = by[("ConfigMap", "mosquitto")]["data"]["mosquitto.conf"]
    assert "allow_anonymous false" in conf and "listener 9001" in conf
    # Messages queued for the instance (acknowledged only once stored) are saved every minute.
    assert "persistence true" in conf and "autosave_interval 60" in conf
    assert "mosquitto_dynamic_security.so" in conf
    # Packets over 64 KiB are refused, and what is queued for a client is bounded.
    assert "message_size_limit 65536" in conf and "max_packet_size 65536" in conf
    assert "max_queued_bytes 67108864" in conf
    # Each listener refuses connections beyond its bound (half-open ones cannot exhaust it).
    assert conf.count("max_connections 10000") == 2
    env = {e["name"]: e for e in container["env"]}
    assert env["MQTT_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "mqtt",
        "key": "admin-password",
    }
    # The dashboard signs browsers' addresses (seen through the ingress) with its own key.
    assert env["LOGIN_RELAY_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "control-plane",
        "key": "login-relay-key",
    }
    assert env["TRUSTED_PROXY_HOPS"]["value"] == "1"
    relay = render(spec(), KubernetesSettings(), "pw", login_relay_key="k" * 64)
    assert {(o["kind"], o["metadata"]["name"]): o for o in relay}[("Secret", "control-plane")][
        "stringData"
    ] == {"login-relay-key": "k" * 64, "usage-token": ""}
    # The ingest client's id, bound on the broker, is kept with its password (optional: an
    # older Secret lacks it until the next update re-applies the Secrets).
    assert env["MQTT_CLIENT_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "mqtt",
        "key": "client-id",
        "optional": True,
    }
    assert env["MONITORING_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "monitoring",
        "key": "token",
        "optional": True,
    }
    # A new broker configuration rolls the broker.
    annotations = broker["template"]["metadata"]["annotations"]
    assert len(annotations["iotistic.io/config-sha256"]) == 16
    policy = by[("NetworkPolicy", "isolate-customer")]["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    # Devices outside the cluster reach the broker through the Gateway, over TLS, and the
    # Gateway's proxies are the only way in from outside the namespace (test_k8s_network.py
    # checks every way in and out).
    paths = {r["matches"][0]["path"]["value"]: r["backendRefs"] for r in route["spec"]["rules"]}
    assert paths["/mqtt"] == [{"kind": "Service", "name": "mosquitto", "port": 9001}]
    assert paths["/"][0]["name"] == "instance"
    assert env["MQTT_PUBLIC_URLS"]["value"] == f"wss://{CUSTOMER}.example.io/mqtt"
    assert policy["ingress"] == [{"from": [{"podSelector": {}}]}]
    assert list(yaml.safe_load_all(render_yaml(objects))) == objects


async def test_deploy_applies_in_order_then_waits_for_readiness(cluster, caplog) -> None:
    standin, url = cluster
    backend = backend_for(url)
    steps = Steps()
    async with backend_running(backend):
        with caplog.at_level(logging.DEBUG):
            deployed = await backend.deploy(spec(), steps)
    patches = [r for r in standin.requests if r["method"] == "PATCH"]
    # Once everything is applied and ready, the namespace is stamped with the manifest set.
    *patches, stamp = patches
    assert stamp["query"]["fieldManager"] == "iotistic-provisioner-stamp"
    assert stamp["body"]["metadata"]["annotations"]["iotistic.io/manifest-sha256"] == (
        backend.manifest_digest(spec())
    )
    assert [o["kind"] for o in render(spec(), KubernetesSettings(), "x")] == [
        r["body"]["kind"] for r in patches
    ]
    for request in patches:
        assert request["content_type"] == "application/apply-patch+yaml"
        assert request["query"] == {"fieldManager": "iotistic-provisioner", "force": "true"}
    assert patches[0]["path"].rstrip("/").endswith(f"/api/v1/namespaces/{NS}")
    assert any(
        p["path"].endswith(f"/apis/apps/v1/namespaces/{NS}/deployments/instance") for p in patches
    )
    reads = [r for r in standin.requests if r["method"] == "GET"]
    assert len(reads) >= 3 * standin.ready_after  # it polled until the rollouts were ready
    percents = [p for p, _ in steps.seen]
    assert percents == sorted(percents) and percents[-1] >= 80
    assert deployed.instance_url == f"https://{CUSTOMER}.iotistic.cloud"
    assert deployed.components == {"postgres": "ready", "mosquitto": "ready", "instance": "ready"}
    secrets = {
        name: standin.objects[f"/api/v1/namespaces/{NS}/secrets/{name}"]["stringData"]
        for name in ("database", "mqtt", "monitoring")
    }
    mqtt = secrets["mqtt"]
    assert mqtt["admin-password"] and mqtt["password"]
    assert mqtt["client-id"].startswith("instance-") and CUSTOMER not in mqtt["client-id"]
    kept = (
        secrets["database"]["password"],
        mqtt["admin-password"],
        mqtt["password"],
        mqtt["client-id"],
        secrets["monitoring"]["token"],
    )
    assert len(set(kept)) == 5
    logged = caplog.text
    for secret in kept:
        assert secret not in logged
    assert spec().license_jwt not in logged


async def test_a_retried_deploy_converges_on_the_same_objects(cluster) -> None:
    standin, url = cluster
    backend = backend_for(url)
    async with backend_running(backend):
        await backend.deploy(spec(), Steps())
        first = {k: v["metadata"]["generation"] for k, v in standin.objects.items()}
        await backend.deploy(spec(), Steps())
    assert {k: v["metadata"]["generation"] for k, v in standin.objects.items()} == first


async def test_update_rolls_the_instance_with_the_new_license(cluster) -> None:
    standin, url = cluster
    backend = backend_for(url)
    async with backend_running(backend):
        await backend.deploy(spec(), Steps())
        applied_before = len(standin.applied())
        generations = {k: v["metadata"]["generation"] for k, v in standin.objects.items()}
        await backend.update(spec("lic-2", "header.claims.signature-two"), Steps())
        status = await backend.status(CUSTOMER)
    # Every object is applied again (a customer deployed by an older version gets today's),
    # and only the license Secret and the instance change.
    rendered = render(spec(), KubernetesSettings(), "x")
    assert standin.applied()[applied_before:] == [
        *((o["kind"], o["metadata"]["name"]) for o in rendered),
        ("Namespace", NS),  # the stamp of the manifest set now applied
    ]
    changed = {
        k for k, v in standin.objects.items() if v["metadata"]["generation"] != generations[k]
    }
    assert changed == {
        f"/api/v1/namespaces/{NS}/secrets/license",
        f"/apis/apps/v1/namespaces/{NS}/deployments/instance",
    }
    instance = standin.objects[f"/apis/apps/v1/namespaces/{NS}/deployments/instance"]
    assert instance["metadata"]["generation"] == 2
    assert (
        instance["spec"]["template"]["metadata"]["annotations"]["iotistic.io/license-id"] == "lic-2"
    )
    secret = standin.objects[f"/api/v1/namespaces/{NS}/secrets/license"]["stringData"]
    assert secret["license.jwt"] == "header.claims.signature-two"
    assert status["release"] == "deployed"


async def test_erasure_removes_the_namespace_and_waits_until_it_is_gone(cluster) -> None:
    standin, url = cluster
    backend = backend_for(url)
    async with backend_running(backend):
        await backend.deploy(spec(), Steps())
        deployed = len(standin.requests)
        await backend.delete(CUSTOMER, Steps(), erase=True)
        status = await backend.status(CUSTOMER)
        await backend.delete(CUSTOMER, Steps(), erase=True)  # again: nothing left, still fine
    deletes = [r for r in standin.requests[deployed:] if r["method"] == "DELETE"]
    assert deletes[0]["path"].endswith(f"/api/v1/namespaces/{NS}")
    assert standin.objects == {}
    assert status == {"release": "missing", "components": {}}


async def test_health_follows_the_workloads_readiness(cluster) -> None:
    standin, url = cluster
    backend = backend_for(url)
    async with backend_running(backend):
        await backend.deploy(spec(), Steps())
        assert await backend.health(CUSTOMER) == InstanceHealth(True)
        standin.unready = {"instance"}
        sick = await backend.health(CUSTOMER)
        assert not sick.healthy
        assert sick.reason == "Deployment instance not available: MinimumReplicasUnavailable"
        standin.unready = {"postgres"}
        assert (
            await backend.health(CUSTOMER)
        ).reason == "StatefulSet postgres: 0 of 1 replicas ready"
        standin.unready = set()
        assert (await backend.health(CUSTOMER)).healthy
        # The health watch's redeploy replaces the pods, as `kubectl rollout restart` does.
        [path] = [k for k in standin.objects if k.endswith(f"{NS}/deployments/instance")]
        generation = standin.objects[path]["metadata"]["generation"]
        await backend.deploy(dataclasses.replace(spec(), restart_key="job-7"), Steps())
        template = standin.objects[path]["spec"]["template"]["metadata"]
        assert template["annotations"]["iotistic.io/restart"] == "job-7"
        assert standin.objects[path]["metadata"]["generation"] == generation + 1
        gets = [r["path"] for r in standin.requests if r["method"] == "GET"]
        assert gets[-1].endswith(f"/namespaces/{NS}/deployments/instance")
        standin.fail_status = 500
        with pytest.raises(BackendError, match="500"):
            await backend.health(CUSTOMER)  # the API is away: nothing said of the instance
        standin.fail_status = None
        await backend.delete(CUSTOMER, Steps())
        kept = await backend.health(CUSTOMER)
        assert not kept.healthy and kept.reason.startswith("deleted; its data is kept until ")
        await backend.delete(CUSTOMER, Steps(), erase=True)
        gone = await backend.health(CUSTOMER)
        assert not gone.healthy
        assert gone.reason.startswith("StatefulSet postgres missing")


async def test_api_failures_and_an_unreachable_server_are_backend_errors(cluster) -> None:
    standin, url = cluster
    standin.fail_status = 500
    backend = backend_for(url)
    async with backend_running(backend):
        with pytest.raises(BackendError, match="500"):
            await backend.deploy(spec(), Steps())
    standin.fail_status = None
    wrong = backend_for(url, token="wrong")
    async with backend_running(wrong):
        with pytest.raises(BackendError, match="401"):
            await wrong.deploy(spec(), Steps())
    from libs.servers.ports import free_port

    nowhere = backend_for(f"http://127.0.0.1:{free_port()}")
    async with backend_running(nowhere):
        with pytest.raises(BackendError, match="not reachable"):
            await nowhere.deploy(spec(), Steps())


def test_render_command_prints_manifests_without_secrets_unless_asked(tmp_path: Path) -> None:
    license_file = tmp_path / "license.jwt"
    license_file.write_text("header.claims.render-signature")
    command = [
        str(Path(sys.executable).parent / "iotistic"),
        "provisioner",
        "render",
        CUSTOMER,
        "--license-file",
        str(license_file),
    ]
    env = {
        "PROVISIONER_SECRET": "r" * 40,
        "LOGIN_RELAY_SECRET": "l" * 40,
        "USAGE_SECRET": "u" * 40,
        "PATH": "/usr/bin:/bin",
        # This checkout's code, whichever checkout the console script was installed from.
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    plain = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert plain.returncode == 0, plain.stderr
    objects: list[dict[str, Any]] = [o for o in yaml.safe_load_all(plain.stdout) if o]
    assert "Secret" not in {o["kind"] for o in objects}
    assert "render-signature" not in plain.stdout
    assert {o["kind"] for o in objects} >= {"Namespace", "Deployment", "HTTPRoute"}
    full = subprocess.run(
        [*command, "--include-secrets"], capture_output=True, text=True, timeout=60, env=env
    )
    assert full.returncode == 0, full.stderr
    assert "render-signature" in full.stdout
    for obj in yaml.safe_load_all(full.stdout):
        if obj and obj["kind"] not in ("HTTPRoute", "BackendTrafficPolicy"):  # CRDs
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    # The Secrets hold what the backend applies: every password, key and token, none empty.
    given = InstanceSpec(
        customer_id=CUSTOMER,
        plan="starter",
        license_jwt="header.claims.render-signature",
        license_id="given",
        jwks_url="http://127.0.0.1:8080/.well-known/jwks.json",
    )

    def secrets_of(text: str) -> dict[str, dict[str, str]]:
        return {
            o["metadata"]["name"]: o["stringData"]
            for o in yaml.safe_load_all(text)
            if o and o["kind"] == "Secret"
        }

    for generation in (0, 2):
        rendered = subprocess.run(
            [*command, "--include-secrets", "--credentials-generation", str(generation)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert rendered.returncode == 0, rendered.stderr
        applied = customer_objects(
            given,
            KubernetesSettings(),
            b"r" * 40,
            "l" * 40,
            usage_secret="u" * 40,
            credentials_generation=generation,
        )
        expected = {
            o["metadata"]["name"]: o["stringData"] for o in applied if o["kind"] == "Secret"
        }
        assert secrets_of(rendered.stdout) == expected
        mqtt = expected["mqtt"]
        assert all(mqtt[k] for k in ("admin-password", "password", "client-id"))
        assert expected["control-plane"]["login-relay-key"]
    # An image a tag could move under running customers is refused (a configuration error).
    unpinned = subprocess.run(
        command, capture_output=True, text=True, timeout=60, env={**env, "MOSQUITTO_IMAGE": "x:1"}
    )
    assert unpinned.returncode == 2
    assert "MOSQUITTO_IMAGE 'x:1' is not pinned by digest" in unpinned.stderr
    allowed = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "MOSQUITTO_IMAGE": "x:1", "ALLOW_UNPINNED_IMAGES": "true"},
    )
    assert allowed.returncode == 0, allowed.stderr
    assert "image: x:1" in allowed.stdout


async def test_a_cluster_has_no_capacity_of_its_own_but_the_operators_limit() -> None:
    async def no_cluster() -> k8s.ApiClient:
        raise AssertionError("capacity asks no API server")

    unlimited = KubernetesBackend(KubernetesSettings(), SECRET, no_cluster)
    assert (await unlimited.capacity()).limit is None
    capped = await KubernetesBackend(
        KubernetesSettings(), SECRET, no_cluster, max_instances=40
    ).capacity()
    assert (capped.limit, capped.limited_by) == (40, "setting")
