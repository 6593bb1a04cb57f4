"""The few Kubernetes API calls the backend makes (server-side apply, get, list, delete), over
kubernetes-asyncio's ApiClient, and how the worker is granted its reads in a tenant's namespace.

Server-side apply: PATCH with ``application/apply-patch+yaml``, field manager
``iotistic-provisioner``, conflicts forced, so the provisioner owns the fields it sets and a
retry converges.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

from services.provisioner.backends.base import BackendError
from services.provisioner.backends.kubernetes.manifests.namespace import reader_binding
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings

log = logging.getLogger(__name__)

FIELD_MANAGER = "iotistic-provisioner"
PLURALS = {
    "Namespace": "namespaces",
    "ResourceQuota": "resourcequotas",
    "LimitRange": "limitranges",
    "NetworkPolicy": "networkpolicies",
    "Secret": "secrets",
    "Service": "services",
    "StatefulSet": "statefulsets",
    "Deployment": "deployments",
    "Ingress": "ingresses",
    "ConfigMap": "configmaps",
    "HTTPRoute": "httproutes",
    "BackendTrafficPolicy": "backendtrafficpolicies",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "CronJob": "cronjobs",
    "Job": "jobs",
    "Pod": "pods",
    "RoleBinding": "rolebindings",
}
# Progress while applying: the percent reached once each object is applied.
# Waits between reads refused with 403 in a tenant namespace once the worker's reads there were
# granted: the API server's authorizer sees a new RoleBinding a moment after it is stored.
GRANT_RETRY_SECONDS = (0.25, 0.5, 1.0, 2.0)
# Grants the worker's reads in a namespace (applies its reader RoleBinding there); False when
# the namespace does not exist (so there is nothing in it to read).
Grant = Callable[[str], Awaitable[bool]]


def object_path(api_version: str, kind: str, name: str, namespace: str | None) -> str:
    """The REST path of an object: ``/api/v1/...`` or ``/apis/<group>/<version>/...``."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    scope = f"/namespaces/{namespace}" if namespace and kind != "Namespace" else ""
    return f"{base}{scope}/{PLURALS[kind]}/{name}"


class KubeApi:
    """The few calls the backend makes, over kubernetes-asyncio's ApiClient."""

    def __init__(self, api: k8s.ApiClient, grant: Grant | None = None) -> None:
        """``api`` is configured for the cluster (in-cluster, kubeconfig, or a given host);
        ``grant`` gives the worker its reads in a tenant namespace when one is refused (403)
        there: a namespace of a customer deployed before the reader RoleBinding existed, or one
        whose RoleBinding the authorizer does not see yet."""
        self._api = api
        self._grant = grant

    async def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        try:
            result = await self._api.call_api(
                path,
                method,
                query_params=query or [],
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
                response_types_map={200: "object", 201: "object", 202: "object"},
                _return_http_data_only=True,
                _request_timeout=30,
            )
        except ApiException as exc:
            raise exc from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise BackendError(f"Kubernetes API not reachable: {type(exc).__name__}") from None
        return result if isinstance(result, dict) else {}

    async def apply(
        self, obj: dict[str, Any], manager: str = FIELD_MANAGER, what: str | None = None
    ) -> dict[str, Any]:
        """Server-side apply ``obj`` as field ``manager``; returns the object as the server
        holds it. A refusal's error says ``what`` was done (by default: applying the object)."""
        applied = await self.apply_if_there(obj, manager, missing_ok=False, what=what)
        return applied or {}

    async def apply_if_there(
        self,
        obj: dict[str, Any],
        manager: str = FIELD_MANAGER,
        missing_ok: bool = True,
        what: str | None = None,
    ) -> dict[str, Any] | None:
        """``apply``, but None when the API answers 404 (the namespace ``obj`` goes in is not
        there) and ``missing_ok``."""
        meta = obj["metadata"]
        path = object_path(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace"))
        try:
            return await self._call(
                "PATCH",
                path,
                body=obj,
                query=[("fieldManager", manager), ("force", "true")],
                content_type="application/apply-patch+yaml",
            )
        except ApiException as exc:
            if exc.status == 404 and missing_ok:
                return None
            raise refused(what or f"applying {obj['kind']} {meta['name']}", exc) from None

    async def _read(
        self,
        what: str,
        path: str,
        namespace: str | None,
        query: list[tuple[str, str]] | None = None,
    ) -> dict[str, Any] | None:
        """GET ``path``; None when it is not there (404). Refused (403) inside a namespace and
        given ``grant``: the worker's reads are granted there (None if the namespace does not
        exist) and the read is tried again while the authorizer catches up."""
        granted = False
        waits = iter(GRANT_RETRY_SECONDS)
        while True:
            try:
                return await self._call("GET", path, query=query)
            except ApiException as exc:
                if exc.status == 404:
                    return None
                if exc.status != 403 or self._grant is None or not namespace:
                    raise refused(what, exc) from None
                wait = next(waits, None)
                if wait is None:
                    raise refused(what, exc) from None
            if not granted:
                granted = True
                if not await self._grant(namespace):
                    return None
            await asyncio.sleep(wait)

    async def get(
        self, api_version: str, kind: str, name: str, namespace: str | None
    ) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        path = object_path(api_version, kind, name, namespace)
        return await self._read(f"reading {kind} {name}", path, namespace)

    async def list(
        self, api_version: str, kind: str, namespace: str | None, label_selector: str
    ) -> list[dict[str, Any]]:
        """The objects of a kind (in ``namespace``, or cluster-wide) that match the labels."""
        path = object_path(api_version, kind, "", namespace).rstrip("/")
        query = [("labelSelector", label_selector)]
        found = await self._read(f"listing {kind}", path, namespace, query)
        return list((found or {}).get("items") or [])

    async def delete(self, api_version: str, kind: str, name: str, namespace: str | None) -> None:
        """Delete the object (its dependents in the background); fine if it is gone."""
        try:
            await self._call(
                "DELETE",
                object_path(api_version, kind, name, namespace),
                body={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "propagationPolicy": "Background",
                },
            )
        except ApiException as exc:
            if exc.status != 404:
                raise refused(f"deleting {kind} {name}", exc) from None


def tenant_api(client: k8s.ApiClient, settings: KubernetesSettings) -> KubeApi:
    """The calls over ``client``; with ``settings.tenant_reader``, a read refused inside a
    tenant namespace is granted there (``grant_reads``) and tried again."""
    if settings.tenant_reader is None:
        return KubeApi(client)

    async def grant(ns: str) -> bool:
        return await grant_reads(KubeApi(client), settings, ns)

    return KubeApi(client, grant)


async def grant_reads(api: KubeApi, settings: KubernetesSettings, ns: str) -> bool:
    """Apply the worker's reader RoleBinding in the tenant namespace ``ns`` (what its manifest
    set holds anyway, right after the Namespace): for a customer deployed before it existed,
    until the rollout re-applies their manifests. False when the namespace is not there or is
    going (the namespace controller may have taken the RoleBinding first, and nothing new may be
    made in it): nothing in it to read."""
    prefix = settings.namespace_prefix
    binding = reader_binding(ns, ns.removeprefix(prefix), settings)
    if binding is None or not ns.startswith(prefix) or ns == prefix:
        raise BackendError(f"the provisioner may not read in namespace {ns}")
    namespace = await api.get("v1", "Namespace", ns, None)
    if namespace is None or (namespace.get("status") or {}).get("phase") == "Terminating":
        return False
    if await api.apply_if_there(binding) is None:
        return False  # gone since
    log.info("granted the provisioner's reads in namespace %s (its RoleBinding)", ns)
    return True


def refused(what: str, exc: ApiException) -> BackendError:
    """The ``BackendError`` of a refused call (``what``: what it did)."""
    # The API's message names the field or reason; the body never holds our secrets' values.
    reason = exc.reason or "error"
    return BackendError(f"Kubernetes refused {what}: {exc.status} {reason}")


async def cluster_client() -> k8s.ApiClient:
    """A client for the cluster the provisioner runs in, else the current kubeconfig context."""
    try:
        k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
    except k8s_config.ConfigException:
        try:
            await k8s_config.load_kube_config()
        except (k8s_config.ConfigException, OSError) as exc:
            raise BackendError(f"no Kubernetes configuration found: {exc}") from None
    return k8s.ApiClient()
