"""The ``kubernetes`` backend: server-side apply of each customer's objects, through
kubernetes-asyncio.

Deploy applies every object of ``k8s_manifests.render`` in order (PATCH with
``application/apply-patch+yaml``, field manager ``iotistic-provisioner``, conflicts forced, so
the provisioner owns the fields it sets and a retry converges), then waits until Postgres,
Mosquitto and the instance are ready, reporting progress. Update re-applies every object; what
changed is the license Secret and the instance Deployment, which the license annotation on its
pod template rolls (and, for a customer deployed by an older version, whatever else is new; what
it replaced, the Ingress, is deleted after deploys and updates). Once a deploy's or update's
objects are ready, the namespace is stamped with their digest (``iotistic.io/manifest-sha256``):
what ``iotistic provisioner rollout`` compares. Volumes only grow: a claim is never applied
smaller than the cluster holds (``k8s_storage``). Delete stops the instance and keeps its
namespace, volumes and backups for the grace period (``k8s_grace``; a redeploy within it takes
the customer back, an hourly purge deletes it after); with erasure it removes the namespace at
once and waits until it is gone. The passwords, the broker client id and the monitoring token
are derived from ``PROVISIONER_SECRET`` (HMAC), so re-applying never changes them; they are
never logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

from contracts.credentials import instance_usage_token, login_relay_key
from services.provisioner.backends import k8s_grace
from services.provisioner.backends.base import (
    BackendError,
    Capacity,
    Deployed,
    InstanceHealth,
    InstanceSpec,
    Progress,
    derive_password,
    tightest,
)
from services.provisioner.backends.k8s_manifests import (
    CREDENTIALS_GENERATION,
    KubernetesSettings,
    host_of,
    namespace_of,
    namespace_owner_conflict,
    reader_binding,
    render,
    secret_conflict,
)
from services.provisioner.backends.k8s_storage import claim_gib, gib_of, keep_grown

log = logging.getLogger(__name__)

FIELD_MANAGER = "iotistic-provisioner"
# The stamp of the manifest set a deploy or update applied, on the namespace, and its manager.
MANIFEST_ANNOTATION = "iotistic.io/manifest-sha256"
STAMP_FIELD_MANAGER = "iotistic-provisioner-stamp"
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
APPLY_STEPS = {
    ("NetworkPolicy", "isolate-customer"): (20, "quota and network policy"),
    ("Secret", "mqtt"): (30, "secrets"),
    ("StatefulSet", "postgres"): (45, "postgres"),
    ("StatefulSet", "mosquitto"): (55, "mosquitto"),
    ("Deployment", "instance"): (70, "instance"),
    ("HTTPRoute", "instance"): (80, "route"),
}
# What older versions applied and this one replaced: removed after each deploy and update. The
# Ingress (ingress-nginx, a certificate per customer) gave way to an HTTPRoute on the Gateway.
REPLACED = (("networking.k8s.io/v1", "Ingress", "instance"),)
WORKLOADS = (("StatefulSet", "postgres"), ("StatefulSet", "mosquitto"), ("Deployment", "instance"))
# Waits between reads refused with 403 in a tenant namespace once the worker's reads there were
# granted: the API server's authorizer sees a new RoleBinding a moment after it is stored.
GRANT_RETRY_SECONDS = (0.25, 0.5, 1.0, 2.0)
# Grants the worker's reads in a namespace (applies its reader RoleBinding there); False when
# the namespace does not exist (so there is nothing in it to read).
Grant = Callable[[str], Awaitable[bool]]


def customer_objects(
    spec: InstanceSpec,
    settings: KubernetesSettings,
    secret: bytes,
    login_relay_secret: str | None = None,
    usage_secret: str | None = None,
    credentials_generation: int = 0,
) -> list[dict[str, Any]]:
    """``render`` with the customer's passwords, broker client id and monitoring token, all
    derived from ``PROVISIONER_SECRET`` and the customer's credentials generation (the login
    relay key from ``LOGIN_RELAY_SECRET``, the usage token from billing's ``USAGE_SECRET``, as
    the local backend derives them): re-applying never changes them, nothing is stored. A
    rotation (the next generation) changes every password and the monitoring token; not the
    broker client id, which names the instance's session (its queued readings)."""
    cid = spec.customer_id
    generation = credentials_generation

    def password(purpose: str) -> str:
        return derive_password(secret, purpose, cid, generation)

    # Every earlier generation's admin password, newest first: the broker may have missed some
    # (a rotation cut off after it recorded its generation, then run again).
    previous_admin = "\n".join(
        derive_password(secret, "mqtt-admin", cid, earlier)
        for earlier in range(generation - 1, -1, -1)
    )
    return render(
        spec,
        settings,
        password("database"),
        mqtt_admin_password=password("mqtt-admin"),
        mqtt_password=password("mqtt"),
        mqtt_client_id=f"instance-{derive_password(secret, 'mqtt-client-id', cid)[:32]}",
        monitoring_token=password("monitoring"),
        login_relay_key=login_relay_key(login_relay_secret, cid) if login_relay_secret else "",
        usage_token=instance_usage_token(usage_secret, cid) if usage_secret else "",
        postgres_password=password("postgres-superuser"),
        mqtt_admin_password_previous=previous_admin,
        credentials_generation=generation,
        secret_fingerprint=secret_fingerprint(secret, cid),
    )


def secret_fingerprint(secret: bytes, customer_id: str) -> str:
    """The customer's fingerprint of ``PROVISIONER_SECRET``, recorded on their Namespace."""
    return derive_password(secret, "secret-fingerprint", customer_id)[:16]


def _owned(namespace: dict[str, Any] | None, customer_id: str) -> dict[str, Any] | None:
    """``namespace`` when it is ``customer_id``'s (or records nobody); ``BackendError`` when
    it is another customer's, whose objects an apply would replace."""
    conflict = namespace_owner_conflict(namespace, customer_id)
    if conflict is not None:
        raise BackendError(conflict)
    return namespace


def credentials_generation_of(namespace: dict[str, Any] | None) -> int:
    """The customer's credentials generation, as recorded on their Namespace (0 when it is
    not there yet, or was made by a version before rotation). A value that is not a count is
    an error, never 0: applying generation 0 would undo a rotation."""
    if namespace is None:
        return 0
    annotations = (namespace.get("metadata") or {}).get("annotations") or {}
    text = annotations.get(CREDENTIALS_GENERATION)
    if text is None:
        return 0
    if not str(text).isdigit():
        name = (namespace.get("metadata") or {}).get("name", "?")
        raise BackendError(f"namespace {name}: {CREDENTIALS_GENERATION} is not a count")
    return int(text)


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

    async def apply(self, obj: dict[str, Any], manager: str = FIELD_MANAGER) -> dict[str, Any]:
        """Server-side apply ``obj`` as field ``manager``; returns the object as the server
        holds it."""
        applied = await self.apply_if_there(obj, manager, missing_ok=False)
        return applied or {}

    async def apply_if_there(
        self, obj: dict[str, Any], manager: str = FIELD_MANAGER, missing_ok: bool = True
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
            raise _failed(f"applying {obj['kind']} {meta['name']}", exc) from None

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
                    raise _failed(what, exc) from None
                wait = next(waits, None)
                if wait is None:
                    raise _failed(what, exc) from None
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
                raise _failed(f"deleting {kind} {name}", exc) from None


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


def _failed(what: str, exc: ApiException) -> BackendError:
    # The API's message names the field or reason; the body never holds our secrets' values.
    reason = exc.reason or "error"
    return BackendError(f"Kubernetes refused {what}: {exc.status} {reason}")


def ready(obj: dict[str, Any] | None) -> bool:
    """Whether a workload has rolled out: observed its generation, wanted replicas ready."""
    if obj is None:
        return False
    status = obj.get("status") or {}
    wanted = (obj.get("spec") or {}).get("replicas", 1)
    generation = (obj.get("metadata") or {}).get("generation", 0)
    if status.get("observedGeneration", 0) < generation:
        return False
    if obj.get("kind") == "Deployment":
        updated = status.get("updatedReplicas", 0)
        return bool(updated >= wanted and status.get("availableReplicas", 0) >= wanted)
    return bool(status.get("readyReplicas", 0) >= wanted)


def serving_trouble(obj: dict[str, Any]) -> str | None:
    """Why a workload does not serve now (fewer ready replicas than wanted, or a Deployment
    whose Available condition is False), or None when it serves. Unlike ``ready``, a rollout in
    progress is no trouble while the wanted replicas are ready."""
    status = obj.get("status") or {}
    wanted = (obj.get("spec") or {}).get("replicas", 1)
    name = f"{obj.get('kind', 'workload')} {(obj.get('metadata') or {}).get('name', '?')}"
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Available" and condition.get("status") == "False":
            why = condition.get("reason") or condition.get("message") or "unavailable"
            return f"{name} not available: {str(why)[:120]}"
    have = status.get("readyReplicas", 0) or 0
    if have < wanted:
        return f"{name}: {have} of {wanted} replicas ready"
    return None


class KubernetesBackend:
    """Runs each customer's instance in a namespace of its own."""

    name = "kubernetes"

    def __init__(
        self,
        settings: KubernetesSettings,
        secret: bytes,
        api_client: Callable[[], Awaitable[k8s.ApiClient]],
        ready_timeout: float = 300.0,
        poll_seconds: float = 2.0,
        login_relay_secret: str | None = None,
        max_instances: int | None = None,
        usage_secret: str | None = None,
    ) -> None:
        """``api_client`` makes the configured client at start (in-cluster or kubeconfig);
        ``max_instances`` is the operator's limit (a cluster grows: none of its own);
        ``usage_secret`` is billing's ``USAGE_SECRET`` (instances' usage tokens derive from
        it; unset: they report no usage)."""
        self._settings = settings
        self._max_instances = max_instances
        self._secret = secret
        self._login_relay_secret = login_relay_secret
        self._usage_secret = usage_secret
        self._make_client = api_client
        self._client: k8s.ApiClient | None = None
        self._ready_timeout = ready_timeout
        self._poll = poll_seconds

    async def capacity(self) -> Capacity:
        """The operator's ``MAX_INSTANCES``, or no limit: the cluster's autoscaler and quotas
        decide, and a pod that cannot be scheduled is reported by the deploy's readiness."""
        return tightest({"setting": self._max_instances})

    @property
    def _api(self) -> KubeApi:
        if self._client is None:
            raise BackendError("the kubernetes backend is not started")
        return tenant_api(self._client, self._settings)

    async def start(self) -> None:
        """Connect to the cluster's API."""
        # kubernetes-asyncio logs whole response bodies at DEBUG, Secrets included: never let
        # that logger below INFO, whatever LOG_LEVEL says.
        logging.getLogger("kubernetes_asyncio.client.rest").setLevel(logging.INFO)
        self._client = await self._make_client()

    async def stop(self) -> None:
        """Close the connection; what runs in the cluster keeps running."""
        if self._client is not None:
            await self._client.close()
            self._client = None

    def objects(self, spec: InstanceSpec, credentials_generation: int = 0) -> list[dict[str, Any]]:
        """The customer's objects, with the passwords derived for ``credentials_generation``."""
        if not self._secret:
            raise BackendError("the kubernetes backend needs PROVISIONER_SECRET")
        return customer_objects(
            spec,
            self._settings,
            self._secret,
            self._login_relay_secret,
            usage_secret=self._usage_secret,
            credentials_generation=credentials_generation,
        )

    def _applicable(
        self, namespace: dict[str, Any] | None, customer_id: str
    ) -> dict[str, Any] | None:
        """``namespace`` when this backend may apply the customer's objects over it: it is
        theirs, and was applied with this PROVISIONER_SECRET (or records neither)."""
        _owned(namespace, customer_id)
        if self._secret:
            conflict = secret_conflict(namespace, secret_fingerprint(self._secret, customer_id))
            if conflict is not None:
                raise BackendError(conflict)
        return namespace

    async def _generation(self, customer_id: str) -> int:
        ns = namespace_of(customer_id, self._settings)
        return credentials_generation_of(
            self._applicable(await self._api.get("v1", "Namespace", ns, None), customer_id)
        )

    async def deploy(self, spec: InstanceSpec, progress: Progress) -> Deployed:
        """Apply everything, then wait for Postgres, Mosquitto and the instance. The
        customer's credentials generation is read back from their Namespace first, so a
        retried or repeated deploy keeps the passwords of the last rotation."""
        api = self._api
        generation = await self._generation(spec.customer_id)
        for obj in await self._to_apply(spec, generation):
            await self._apply(api, obj)
            step = (
                (10, "namespace")
                if obj["kind"] == "Namespace"
                else APPLY_STEPS.get((obj["kind"], obj["metadata"]["name"]))
            )
            if step is not None:
                await progress(*step)
        await self._remove_replaced(spec.customer_id)
        await self._wait_ready(spec.customer_id, progress, 80)
        await self.stamp_manifest(spec)
        return self._deployed(spec.customer_id)

    async def update(self, spec: InstanceSpec, progress: Progress) -> Deployed:
        """New license: re-apply every object (what did not change stays as it is, so only
        the license Secret and the instance, which rolls, move), and wait for it. Applying
        them all also brings a customer deployed by an older version to today's objects."""
        api = self._api
        ns = namespace_of(spec.customer_id, self._settings)
        namespace = self._applicable(await api.get("v1", "Namespace", ns, None), spec.customer_id)
        if namespace is None:
            return await self.deploy(spec, progress)
        for obj in await self._to_apply(spec, credentials_generation_of(namespace)):
            await self._apply(api, obj)
        await self._remove_replaced(spec.customer_id)
        await progress(40, "license applied")
        await self._wait_ready(spec.customer_id, progress, 40)
        await self.stamp_manifest(spec)
        return self._deployed(spec.customer_id)

    async def _to_apply(self, spec: InstanceSpec, generation: int) -> list[dict[str, Any]]:
        """The objects (for credentials ``generation``), with no volume smaller than the
        cluster holds (volumes only grow), once a namespace kept after a deletion is taken
        back from its grace period."""
        api = self._api
        objects = self.objects(spec, generation)
        ns = namespace_of(spec.customer_id, self._settings)
        current = {}
        for obj in objects:
            if obj["kind"] == "PersistentVolumeClaim":
                name = obj["metadata"]["name"]
                size = claim_gib(await api.get("v1", "PersistentVolumeClaim", name, ns))
                if size is not None:
                    current[name] = size
        await k8s_grace.take_back(api, ns)
        return keep_grown(objects, current)

    async def _apply(self, api: KubeApi, obj: dict[str, Any]) -> None:
        """Apply ``obj``; a volume the cluster refuses to grow (its StorageClass does not
        allow expansion) stays as it is, loudly, rather than hold back the rest (a new
        license): the tenant disk alerts then show it filling."""
        try:
            await api.apply(obj)
        except BackendError as exc:
            if obj["kind"] != "PersistentVolumeClaim":
                raise
            meta = obj["metadata"]
            have = claim_gib(await api.get("v1", obj["kind"], meta["name"], meta["namespace"]))
            wanted = gib_of(obj["spec"]["resources"]["requests"]["storage"])
            if have is None or have >= wanted:
                raise
            log.warning(
                "volume %s/%s stays at %dGi, not grown to %dGi (does its StorageClass allow "
                "volume expansion?): %s",
                meta["namespace"],
                meta["name"],
                have,
                wanted,
                exc,
            )

    async def rotate_credentials(self, spec: InstanceSpec, progress: Progress) -> int:
        """Give the deployed customer new passwords: the next credentials generation, applied
        with every object (the Namespace, which records it, first), then wait until the pods
        rolled by it are ready. Postgres's start sets its roles' new passwords, the broker's
        moves its admin to the new one, the instance's sets its ingest client's. Returns the
        new generation. Raises ``BackendError`` when the customer is not deployed."""
        generation = await self.apply_next_credentials(spec)
        await progress(40, f"credentials generation {generation} applied")
        await self.wait_ready(spec.customer_id, progress, 40)
        return generation

    async def apply_next_credentials(self, spec: InstanceSpec) -> int:
        """The first half of ``rotate_credentials``: apply every object with the next
        credentials generation (the Namespace, which records it, first); returns it."""
        api = self._api
        ns = namespace_of(spec.customer_id, self._settings)
        namespace = self._applicable(await api.get("v1", "Namespace", ns, None), spec.customer_id)
        if namespace is None:
            raise BackendError(f"namespace {ns} not found: nothing to rotate")
        if (namespace.get("metadata") or {}).get("deletionTimestamp"):
            raise BackendError(f"namespace {ns} is being deleted: nothing to rotate")
        generation = credentials_generation_of(namespace) + 1
        for obj in await self._to_apply(spec, generation):
            await self._apply(api, obj)
        return generation

    async def wait_ready(self, customer_id: str, progress: Progress, start: int) -> None:
        """Wait until the customer's Postgres, Mosquitto and instance are ready (the second
        half of ``rotate_credentials``); ``BackendError`` after the ready timeout."""
        await self._wait_ready(customer_id, progress, start)

    async def delete(self, customer_id: str, progress: Progress, erase: bool = False) -> None:
        """Stop the customer's instance and keep its data for the grace period: workloads
        scaled to 0, the public route removed, backups suspended, and the namespace marked
        with when it goes (``purge_expired`` deletes it then). With ``erase`` (the customer
        asked for it), delete the namespace, volumes and backups with it, at once. Never
        another customer's namespace, whose id maps to the same name."""
        ns = namespace_of(customer_id, self._settings)
        _owned(await self._api.get("v1", "Namespace", ns, None), customer_id)
        if not erase:
            await k8s_grace.keep_for_grace(self._api, ns, self._settings, progress)
            return
        api = self._api
        await progress(10, "deleting namespace")
        await api.delete("v1", "Namespace", ns, None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ready_timeout
        while await api.get("v1", "Namespace", ns, None) is not None:
            if loop.time() > deadline:
                raise BackendError(f"namespace {ns} still terminating after {self._ready_timeout}s")
            await progress(50, "waiting for the namespace to go")
            await asyncio.sleep(self._poll)

    async def purge_expired(self) -> list[str]:
        """Delete the namespaces of deleted customers whose grace period is over; their
        names. Idempotent: a namespace already going is passed over."""
        return await k8s_grace.purge_expired(self._api)

    async def status(self, customer_id: str) -> dict[str, object]:
        """Release state from the namespace and each workload's readiness."""
        api = self._api
        ns = namespace_of(customer_id, self._settings)
        namespace = await api.get("v1", "Namespace", ns, None)
        if namespace is None:
            return {"release": "missing", "components": {}}
        kept_until = k8s_grace.kept_until(namespace)
        terminating = (namespace.get("status") or {}).get("phase") == "Terminating"
        if kept_until is not None and not terminating:
            # Deleted, its data kept for the grace period: a redeploy takes it back.
            return {"release": "deleted", "namespace": ns, "purge_after": kept_until}
        states = {}
        for kind, name in WORKLOADS:
            obj = await api.get("apps/v1", kind, name, ns)
            states[name] = "missing" if obj is None else ("ready" if ready(obj) else "progressing")
        phase = (namespace.get("status") or {}).get("phase")
        release = (
            "terminating"
            if phase == "Terminating"
            else ("deployed" if all(s == "ready" for s in states.values()) else "progressing")
        )
        return {"release": release, "namespace": ns, "components": states}

    async def health(self, customer_id: str) -> InstanceHealth:
        """Healthy when the namespace is there and Postgres, Mosquitto and the instance
        Deployment have their wanted replicas ready (and the Deployment is Available)."""
        api = self._api
        ns = namespace_of(customer_id, self._settings)
        kept_until = k8s_grace.kept_until(await api.get("v1", "Namespace", ns, None))
        if kept_until is not None:
            return InstanceHealth(False, f"deleted; its data is kept until {kept_until}")
        troubles = []
        for kind, name in WORKLOADS:
            obj = await api.get("apps/v1", kind, name, ns)
            trouble = f"{kind} {name} missing" if obj is None else serving_trouble(obj)
            if trouble is not None:
                troubles.append(trouble)
        if troubles:
            return InstanceHealth(False, "; ".join(troubles))
        return InstanceHealth(True)

    async def _remove_replaced(self, customer_id: str) -> None:
        """Delete what an older version applied and this one replaced (fine if never there)."""
        ns = namespace_of(customer_id, self._settings)
        for api_version, kind, name in REPLACED:
            await self._api.delete(api_version, kind, name, ns)

    async def _wait_ready(self, customer_id: str, progress: Progress, start: int) -> None:
        api = self._api
        ns = namespace_of(customer_id, self._settings)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ready_timeout
        reported = -1
        while True:
            states = [ready(await api.get("apps/v1", k, n, ns)) for k, n in WORKLOADS]
            done = sum(states)
            if done == len(WORKLOADS):
                return
            if loop.time() > deadline:
                waiting = [n for (_, n), ok in zip(WORKLOADS, states, strict=True) if not ok]
                raise BackendError(
                    f"not ready after {self._ready_timeout:.0f}s: {', '.join(waiting)}"
                )
            if done != reported:
                reported = done
                await progress(start + (99 - start) * done // len(WORKLOADS), "readiness")
            await asyncio.sleep(self._poll)

    # --- the manifest stamp (what the fleet rollout compares; services/provisioner/rollout.py) --

    def manifest_digest(self, spec: InstanceSpec) -> str:
        """The digest of every object the customer's instance would be applied with now (a
        health-watch restart key aside: it replaces pods, it changes no manifest)."""
        return manifest_digest(self.objects(dataclasses.replace(spec, restart_key=None)))

    async def applied_manifest(self, customer_id: str) -> str | None:
        """The digest a deploy or update stamped on the namespace once its objects were all
        applied and ready; None if none did (never, or an older version)."""
        ns = namespace_of(customer_id, self._settings)
        namespace = await self._api.get("v1", "Namespace", ns, None)
        annotations = ((namespace or {}).get("metadata") or {}).get("annotations") or {}
        value = annotations.get(MANIFEST_ANNOTATION)
        return str(value) if value else None

    async def stamp_manifest(self, spec: InstanceSpec) -> None:
        """Record on the namespace that this manifest set is applied and ready."""
        await self._stamp(spec.customer_id, {MANIFEST_ANNOTATION: self.manifest_digest(spec)})

    async def clear_manifest_stamp(self, customer_id: str) -> None:
        """Forget the stamp (a rollout's health gate failed after the job): the next rollout
        applies this customer again rather than skip them as done."""
        ns = namespace_of(customer_id, self._settings)
        namespace = await self._api.get("v1", "Namespace", ns, None)
        if namespace is None or (namespace.get("status") or {}).get("phase") == "Terminating":
            return  # nothing to take back, and an apply would make the namespace again
        await self._stamp(customer_id, None)

    async def _stamp(self, customer_id: str, annotations: dict[str, str] | None) -> None:
        # A field manager of its own: the provisioner's apply of the Namespace (which does not
        # carry the annotation) leaves it alone, and applying without it removes it (SSA).
        ns = namespace_of(customer_id, self._settings)
        metadata: dict[str, Any] = {"name": ns}
        if annotations:
            metadata["annotations"] = annotations
        try:
            await self._api._call(
                "PATCH",
                object_path("v1", "Namespace", ns, None),
                body={"apiVersion": "v1", "kind": "Namespace", "metadata": metadata},
                query=[("fieldManager", STAMP_FIELD_MANAGER), ("force", "true")],
                content_type="application/apply-patch+yaml",
            )
        except ApiException as exc:
            raise _failed(f"stamping namespace {ns}", exc) from None

    def _deployed(self, customer_id: str) -> Deployed:
        return Deployed(
            instance_url=f"https://{host_of(customer_id, self._settings)}",
            components={name: "ready" for _, name in WORKLOADS},
        )


def manifest_digest(objects: list[dict[str, Any]]) -> str:
    """sha256 of the objects in canonical JSON: equal exactly when the same manifests would be
    applied. Secrets' values are in it, so a changed derived password counts; they are random
    HMAC outputs, which a digest does not reveal."""
    canonical = json.dumps(objects, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


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
