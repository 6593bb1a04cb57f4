"""The ``kubernetes`` backend: server-side apply of each customer's objects (kubernetes-asyncio).

Deploy applies every object of ``manifests.render`` in order (server-side apply: ``api``), then
waits until Postgres, Mosquitto and the instance are ready, reporting each step. Update
re-applies every object; what changed is the license Secret and the instance Deployment, which
the license annotation on its pod template rolls (and, for a customer deployed by an older
version, whatever else is new; what it replaced, the Ingress, is deleted after deploys and
updates). The job's trace is handed to the instance pod it starts (``trace``: a ConfigMap, not
the pod template) and taken back once it is ready or failed. Once ready, the namespace is
stamped with the objects' digest (``stamp``): what ``iotistic provisioner rollout`` compares.
Volumes only grow: a claim is never applied smaller than the cluster holds (``storage``). Delete
stops the instance and keeps its namespace, volumes and backups for the grace period
(``grace``; a redeploy within it takes the customer back, an hourly purge deletes it after);
with erasure it removes the namespace at once and waits until it is gone. The passwords, the
broker client id and the monitoring token are derived from ``PROVISIONER_SECRET`` (HMAC,
``credentials``), so re-applying never changes them; they are never logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from kubernetes_asyncio import client as k8s

from services.provisioner.backends.base import (
    BackendError,
    Capacity,
    Deployed,
    InstanceHealth,
    InstanceSpec,
    Progress,
    tightest,
)
from services.provisioner.backends.kubernetes import grace, stamp
from services.provisioner.backends.kubernetes.api import KubeApi, tenant_api
from services.provisioner.backends.kubernetes.credentials import (
    credentials_generation_of,
    customer_objects,
    owned,
    secret_fingerprint,
)
from services.provisioner.backends.kubernetes.manifests.metadata import host_of, namespace_of
from services.provisioner.backends.kubernetes.manifests.namespace import secret_conflict
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings
from services.provisioner.backends.kubernetes.readiness import ready, serving_trouble
from services.provisioner.backends.kubernetes.stamp import manifest_digest
from services.provisioner.backends.kubernetes.storage import claim_gib, gib_of, keep_grown
from services.provisioner.backends.kubernetes.trace import hand_trace_before, take_trace_back

log = logging.getLogger(__name__)

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
        owned(namespace, customer_id)
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
        api, ns = self._api, namespace_of(spec.customer_id, self._settings)
        generation = await self._generation(spec.customer_id)
        handed = False
        for obj in await self._to_apply(spec, generation):
            step = (
                (10, "namespace")
                if obj["kind"] == "Namespace"
                else APPLY_STEPS.get((obj["kind"], obj["metadata"]["name"]))
            )
            if step is not None:
                # Reported as it begins, so the step's span holds what it does.
                await progress(*step)
            handed = await hand_trace_before(api, obj, ns, spec.customer_id) or handed
            await self._apply(api, obj)
        await self._remove_replaced(spec.customer_id)
        try:
            await self._wait_ready(spec.customer_id, progress, 80)
        finally:  # ready or not: a pod that starts later must not join this attempt's trace
            if handed:
                await take_trace_back(api, ns, spec.customer_id)
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
        handed = False
        for obj in await self._to_apply(spec, credentials_generation_of(namespace)):
            handed = await hand_trace_before(api, obj, ns, spec.customer_id) or handed
            await self._apply(api, obj)
        await self._remove_replaced(spec.customer_id)
        await progress(40, "license applied")
        try:
            await self._wait_ready(spec.customer_id, progress, 40)
        finally:  # ready or not: a pod that starts later must not join this attempt's trace
            if handed:
                await take_trace_back(api, ns, spec.customer_id)
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
        await grace.take_back(api, ns)
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
        owned(await self._api.get("v1", "Namespace", ns, None), customer_id)
        if not erase:
            await grace.keep_for_grace(self._api, ns, self._settings, progress)
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
        return await grace.purge_expired(self._api)

    async def status(self, customer_id: str) -> dict[str, object]:
        """Release state from the namespace and each workload's readiness."""
        api = self._api
        ns = namespace_of(customer_id, self._settings)
        namespace = await api.get("v1", "Namespace", ns, None)
        if namespace is None:
            return {"release": "missing", "components": {}}
        kept_until = grace.kept_until(namespace)
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
        kept_until = grace.kept_until(await api.get("v1", "Namespace", ns, None))
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
        return await stamp.applied_digest(self._api, namespace_of(customer_id, self._settings))

    async def stamp_manifest(self, spec: InstanceSpec) -> None:
        """Record on the namespace that this manifest set is applied and ready."""
        ns = namespace_of(spec.customer_id, self._settings)
        await stamp.stamp(self._api, ns, self.manifest_digest(spec))

    async def clear_manifest_stamp(self, customer_id: str) -> None:
        """Forget the stamp (a rollout's health gate failed after the job): the next rollout
        applies this customer again rather than skip them as done."""
        await stamp.clear_stamp(self._api, namespace_of(customer_id, self._settings))

    def _deployed(self, customer_id: str) -> Deployed:
        return Deployed(
            instance_url=f"https://{host_of(customer_id, self._settings)}",
            components={name: "ready" for _, name in WORKLOADS},
        )
