"""The worker's reads, confined to tenant namespaces: each tenant's manifest set binds the
chart's reader ClusterRole to the worker in that namespace only (the chart's side, and the
admission policy that admits that RoleBinding alone, are in tests/deploy/test_rbac_policy.py).

The calls go to the STAND-IN of the API server (tests/k8s_standin.py), with its labelled
authorizer on: a read inside a namespace is refused (403) unless a RoleBinding there binds the
reader role, as the chart's RBAC does on a real cluster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from k8s_standin import (
    KubeStandIn,
    api_client_for,
    backend_running,
    no_progress,
    served,
    starter_spec,
)
from kubernetes_asyncio.client.exceptions import ApiException

from libs.config import ConfigError
from services.provisioner.app import kubernetes_settings
from services.provisioner.backends.base import BackendError, InstanceSpec
from services.provisioner.backends.kubernetes.api import GRANT_RETRY_SECONDS, KubeApi
from services.provisioner.backends.kubernetes.backend import KubernetesBackend
from services.provisioner.backends.kubernetes.manifests.namespace import READER_BINDING
from services.provisioner.backends.kubernetes.manifests.render import render
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings
from services.provisioner.settings import ProvisionerSettings, parse_tenant_reader

CUSTOMER = "8f14e45f-ceea-4e7a-9c3b-2d1f0a6b7c11"
NS = f"customer-{CUSTOMER}"
SECRET = b"k" * 40
READER = "rel-iotistic-provisioner-worker-tenant-reader"
WORKER = ("iot", "rel-iotistic-provisioner-worker")
BINDING_PATH = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}/rolebindings/{READER_BINDING}"


def spec() -> InstanceSpec:
    return starter_spec(CUSTOMER, license_jwt="header.claims.signature-one")


def settings(reader: bool = True) -> KubernetesSettings:
    return KubernetesSettings(tenant_reader=(READER, *WORKER) if reader else None)


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[KubeStandIn, str]]:
    standin = KubeStandIn(reader_role=READER)
    async with served(standin) as url:
        yield standin, url


def backend_for(url: str, reader: bool = True) -> KubernetesBackend:
    return KubernetesBackend(
        settings(reader), SECRET, api_client_for(url), ready_timeout=20, poll_seconds=0.05
    )


def test_the_reader_binding_follows_the_namespace_and_binds_the_role_to_the_worker() -> None:
    objects = render(spec(), settings(), "pw")
    assert [o["kind"] for o in objects[:2]] == ["Namespace", "RoleBinding"]
    binding = objects[1]
    assert binding["apiVersion"] == "rbac.authorization.k8s.io/v1"
    assert binding["metadata"]["name"] == READER_BINDING
    assert binding["metadata"]["namespace"] == NS
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": READER,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": WORKER[1], "namespace": "iot"}
    ]
    # Outside the chart (the local default): no RoleBinding at all.
    assert "RoleBinding" not in {o["kind"] for o in render(spec(), settings(False), "pw")}


def test_the_settings_name_the_role_and_the_worker_together() -> None:
    assert parse_tenant_reader("", "") is None
    assert parse_tenant_reader(READER, "iot:worker") == (READER, "iot", "worker")
    for role, account in [
        (READER, ""),
        ("", "iot:worker"),
        (READER, "worker"),
        (READER, "iot:"),
        (READER, "Iot:worker"),
        ("a b", "iot:worker"),
    ]:
        with pytest.raises(ConfigError):
            parse_tenant_reader(role, account)
    wired = kubernetes_settings(
        ProvisionerSettings(
            kubernetes_tenant_reader_role=READER,
            kubernetes_worker_service_account="iot:rel-iotistic-provisioner-worker",
            allow_unpinned_images=True,
        )
    )
    assert wired.tenant_reader == (READER, *WORKER)
    assert kubernetes_settings(ProvisionerSettings()).tenant_reader is None


async def test_a_first_deploy_binds_the_reads_before_it_reads(
    cluster: tuple[KubeStandIn, str],
) -> None:
    standin, url = cluster
    backend = backend_for(url)
    async with backend_running(backend):
        deployed = await backend.deploy(spec(), no_progress)
        health = await backend.health(CUSTOMER)
    assert deployed.components == {"postgres": "ready", "mosquitto": "ready", "instance": "ready"}
    assert health.healthy, health
    # The first reads (the volumes' sizes, before the namespace existed) were refused, and
    # the grant each asked for found no namespace: nothing to read, nothing applied. Then the
    # namespace, its reader RoleBinding, and the rest of the manifest set.
    assert standin.applied()[:2] == [("Namespace", NS), ("RoleBinding", READER_BINDING)]
    assert standin.objects[BINDING_PATH]["roleRef"]["name"] == READER


async def test_a_customer_deployed_before_the_binding_is_granted_it_on_first_read(
    cluster: tuple[KubeStandIn, str],
) -> None:
    standin, url = cluster
    backend = backend_for(url)
    async with backend_running(backend):
        await backend.deploy(spec(), no_progress)
        # As a namespace made by an older version: no reader RoleBinding in it.
        del standin.objects[BINDING_PATH]
        before = len(standin.applied())
        health = await backend.health(CUSTOMER)
        status = await backend.status(CUSTOMER)
    assert health.healthy, health
    assert status["release"] == "deployed"
    # The first read was refused; the binding was applied once, and the reads went on.
    assert standin.applied()[before:] == [("RoleBinding", READER_BINDING)]
    assert BINDING_PATH in standin.objects


async def test_without_the_binding_the_worker_reads_nothing_in_a_tenant(
    cluster: tuple[KubeStandIn, str],
) -> None:
    standin, url = cluster
    backend = backend_for(url)
    async with backend_running(backend):
        await backend.deploy(spec(), no_progress)
    del standin.objects[BINDING_PATH]
    # A provisioner not told the reader role (settings empty) renders no binding and grants
    # none: the cluster refuses its reads inside the namespace.
    unbound = backend_for(url, reader=False)
    async with backend_running(unbound):
        with pytest.raises(BackendError, match="403"):
            await unbound.health(CUSTOMER)


async def test_reads_in_a_namespace_that_is_not_a_tenants_are_not_granted(
    cluster: tuple[KubeStandIn, str],
) -> None:
    _, url = cluster
    backend = backend_for(url)
    async with backend_running(backend):
        api: Any = backend._api
        with pytest.raises(BackendError, match="may not read in namespace kube-system"):
            await api.get("apps/v1", "Deployment", "coredns", "kube-system")


async def test_a_namespace_going_away_is_not_granted_reads(
    cluster: tuple[KubeStandIn, str],
) -> None:
    standin, url = cluster
    backend = backend_for(url)
    async with backend_running(backend):
        await backend.deploy(spec(), no_progress)
        # Erasure under way: the namespace controller took the RoleBinding before the workloads.
        standin.objects[f"/api/v1/namespaces/{NS}"]["status"] = {"phase": "Terminating"}
        del standin.objects[BINDING_PATH]
        before = len(standin.applied())
        status = await backend.status(CUSTOMER)
    assert status["release"] == "terminating"
    assert status["components"] == {
        "postgres": "missing",
        "mosquitto": "missing",
        "instance": "missing",
    }
    assert standin.applied()[before:] == []  # nothing made in a namespace that is going


class LaggingApi(KubeApi):
    """A read refused ``refusals`` times (the authorizer not yet seeing the new RoleBinding),
    then answered: the calls it got, in order."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.granted: list[str] = []
        self.calls = 0

        async def grant(ns: str) -> bool:
            self.granted.append(ns)
            return True

        super().__init__(None, grant)  # type: ignore[arg-type]

    async def _call(self, method: str, path: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.calls += 1
        if self.calls <= self.refusals:
            raise ApiException(status=403, reason="Forbidden")
        return {"kind": "Deployment", "metadata": {"name": "instance"}}


async def test_a_read_granted_is_tried_again_while_the_authorizer_catches_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr("services.provisioner.backends.kubernetes.api.asyncio.sleep", sleep)
    api = LaggingApi(refusals=3)
    assert await api.get("apps/v1", "Deployment", "instance", NS) is not None
    assert api.granted == [NS]  # granted once, however many retries
    assert slept == list(GRANT_RETRY_SECONDS[:3])
    # Refused still after every retry: the refusal is reported, not taken for "missing".
    stubborn = LaggingApi(refusals=100)
    with pytest.raises(BackendError, match="403"):
        await stubborn.get("apps/v1", "Deployment", "instance", NS)
    assert stubborn.calls == len(GRANT_RETRY_SECONDS) + 1
