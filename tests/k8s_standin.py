"""STAND-IN for a Kubernetes API server, which cannot run on these machines.

It is not Kubernetes: it answers only what the provisioner's kubernetes backend calls, the way
the API server documents it — server-side apply (PATCH with ``application/apply-patch+yaml``,
``fieldManager``, ``force``), GET, and DELETE of a namespace (which terminates, then takes its
objects with it) — and records every request so tests can check the call sequence. Workloads
report ready after ``ready_after`` reads, the way a rollout takes a while; a changed spec bumps
``metadata.generation`` and starts a new rollout; ``unready`` names workloads whose pods stopped
being ready (``name`` in every namespace, or ``namespace/name``). Applies by different field
managers merge as server-side apply documents it: each manager's last applied configuration is
kept, and the object is all of them merged (the latest wins where they overlap), so a manager
that drops a field removes it only if no other manager set it. An update of a StatefulSet's
spec beyond what may change (its volume claim templates, say) is refused with 422. The
manifests themselves are checked against the real Kubernetes schemas separately
(kubernetes-validate).

Added for deletion with a grace period and the restore drill, just as labelled: GET of a
collection with a ``labelSelector`` lists; a Job cannot run here, so after ``ready_after``
reads it reports Complete (Failed if named in ``failing_jobs``) with a Pod whose container
ended with ``job_message`` as its termination message; ``refuse_growth`` refuses a bigger
claim, as a StorageClass without volume expansion does.

Added for the worker's reads confined to tenant namespaces, just as labelled: a RoleBinding
(rbac.authorization.k8s.io/v1) is applied like any object. With ``reader_role`` set, the
stand-in plays the API server's authorizer for a worker whose ClusterRole holds no read inside a
namespace: a GET or list there is refused with 403 unless a RoleBinding in that namespace binds
the ClusterRole ``reader_role`` (here at once; the API server's authorizer sees a new binding a
moment later); and, as the API server does, an apply into a namespace that does not exist is
refused with 404. Nothing else of RBAC is played (the chart's roles are checked separately).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio import client as k8s
from litestar import Litestar, Request, Response, route
from litestar.params import FromPath

from services.provisioner.backends.base import InstanceSpec
from services.provisioner.backends.kubernetes.api import KubeApi
from services.provisioner.backends.kubernetes.backend import KubernetesBackend
from support import serving

WORKLOAD_KINDS = ("Deployment", "StatefulSet")
# What of a StatefulSet's spec an update may change; the API server refuses any other change
# (its volume claim templates, say) with this message.
STATEFULSET_MUTABLE = (
    "replicas",
    "ordinals",
    "template",
    "updateStrategy",
    "persistentVolumeClaimRetentionPolicy",
    "minReadySeconds",
)
STATEFULSET_FORBIDDEN = (
    "spec: Forbidden: updates to statefulset spec for fields other than 'replicas', "
    "'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and "
    "'minReadySeconds' are forbidden"
)


@dataclass
class KubeStandIn:
    """The stand-in's objects, requests, and knobs."""

    ready_after: int = 2
    gone_after: int = 2
    token: str = "standin-token"
    fail_status: int | None = None
    # Workloads (by name) whose pods stopped being ready, as a crash-looping pod's would.
    unready: set[str] = field(default_factory=set)
    # Per object, each field manager's last applied configuration, oldest apply first.
    applied_configs: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    reads: dict[str, int] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    failing_jobs: set[str] = field(default_factory=set)
    # A StorageClass without allowVolumeExpansion: a claim's request may not grow.
    refuse_growth: bool = False
    job_message: str = "drill ok (stand-in: no Job runs here)"
    # The reader ClusterRole a RoleBinding must bind for reads inside a namespace; None: no
    # authorizer played.
    reader_role: str | None = None

    def app(self) -> Litestar:
        """The HTTP server, for uvicorn."""

        @route("/{path:path}", http_method=["GET", "PATCH", "DELETE"], status_code=200)
        async def handle(request: Request[Any, Any, Any], path: FromPath[str]) -> Response[Any]:
            body = await request.body()
            self.requests.append(
                {
                    "method": request.method,
                    "path": path,
                    "query": dict(request.query_params),
                    "content_type": request.headers.get("content-type", ""),
                    "body": json.loads(body) if body else None,
                    "user_agent": request.headers.get("user-agent", ""),
                }
            )
            if request.headers.get("authorization") != f"Bearer {self.token}":
                return _status(401, "Unauthorized", "no valid bearer token")
            if self.fail_status is not None:
                return _status(self.fail_status, "InternalError", "injected failure")
            inside = _namespace_inside(path)
            if request.method == "PATCH":
                if self._namespace_missing(inside):
                    return _status(404, "NotFound", f'namespaces "{inside}" not found')
                return self._apply(path, request, json.loads(body))
            if request.method == "DELETE":
                return self._delete(path)
            if inside is not None and not self._may_read(inside):
                return _status(403, "Forbidden", f"cannot read in the namespace {inside}")
            return self._get(path, request.query_params.get("labelSelector"))

        return Litestar([handle], debug=False)

    def _apply(
        self, path: str, request: Request[Any, Any, Any], obj: dict[str, Any]
    ) -> Response[Any]:
        if request.headers.get("content-type") != "application/apply-patch+yaml":
            return _status(415, "UnsupportedMediaType", "server-side apply needs apply-patch+yaml")
        if not request.query_params.get("fieldManager"):
            return _status(422, "Invalid", "fieldManager is required for apply")
        stored = self.objects.get(path)
        if self.refuse_growth and stored is not None and obj.get("kind") == "PersistentVolumeClaim":
            size = obj.get("spec", {}).get("resources", {}).get("requests", {}).get("storage")
            if size != stored["spec"]["resources"]["requests"]["storage"]:
                return _status(
                    403,
                    "Forbidden",
                    "only dynamically provisioned pvc can be resized and the storageclass that "
                    "provisions the pvc must support resize",
                )
        manager = request.query_params["fieldManager"]
        configs = dict(self.applied_configs.get(path, {})) if stored is not None else {}
        configs.pop(manager, None)
        configs[manager] = copy.deepcopy(obj)
        obj = {}
        for config in configs.values():
            obj = _merged(obj, config)
        statefulset = stored is not None and obj.get("kind") == "StatefulSet"
        if statefulset and _fixed(stored or {}) != _fixed(obj):
            return _status(422, "Invalid", STATEFULSET_FORBIDDEN)
        self.applied_configs[path] = configs
        meta = obj.setdefault("metadata", {})
        if stored is None:
            meta["generation"] = 1
            meta["uid"] = f"uid-{len(self.objects) + 1}"
        else:
            meta["uid"] = stored["metadata"]["uid"]
            same = (
                stored.get("spec") == obj.get("spec")
                and stored.get("data") == obj.get("data")
                and stored.get("stringData") == obj.get("stringData")
            )
            meta["generation"] = stored["metadata"]["generation"] + (0 if same else 1)
            if not same:
                self.reads[path] = 0  # a new rollout
        obj["status"] = {"phase": "Active"} if obj.get("kind") == "Namespace" else {}
        self.objects[path] = obj
        return Response(obj, status_code=201 if stored is None else 200)

    def _list(self, path: str, selector: str) -> Response[Any]:
        wanted = dict(part.split("=", 1) for part in selector.split(",") if part)
        items = []
        for key, obj in self.objects.items():
            if key.rsplit("/", 1)[0] != path:
                continue
            labels = obj.get("metadata", {}).get("labels") or {}
            if all(labels.get(k) == v for k, v in wanted.items()):
                items.append(obj)
        return Response({"kind": "List", "apiVersion": "v1", "items": items})

    def _finish_job(self, path: str, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        failed = name in self.failing_jobs
        condition = "Failed" if failed else "Complete"
        job["status"] = {
            "conditions": [{"type": condition, "status": "True"}],
            ("failed" if failed else "succeeded"): 1,
        }
        ns = job["metadata"]["namespace"]
        pod_path = path.replace(
            f"apis/batch/v1/namespaces/{ns}/jobs/", f"api/v1/namespaces/{ns}/pods/"
        )
        self.objects[pod_path + "-standin"] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{name}-standin", "namespace": ns, "labels": {"job-name": name}},
            "status": {
                "phase": "Failed" if failed else "Succeeded",
                "containerStatuses": [
                    {
                        "name": "backup",
                        "state": {
                            "terminated": {
                                "exitCode": 1 if failed else 0,
                                "message": self.job_message,
                            }
                        },
                    }
                ],
            },
        }

    def _get(self, path: str, selector: str | None = None) -> Response[Any]:
        obj = self.objects.get(path)
        if obj is None and selector is not None:
            return self._list(path, selector)
        if obj is None:
            return _status(404, "NotFound", f"{path} not found")
        self.reads[path] = self.reads.get(path, 0) + 1
        terminating = obj.get("kind") == "Namespace" and obj["status"].get("phase") == "Terminating"
        if terminating and self.reads[path] >= self.gone_after:
            prefix = f"namespaces/{obj['metadata']['name']}/"
            for key in [k for k in self.objects if prefix in k or k == path]:
                del self.objects[key]
                self.applied_configs.pop(key, None)
            return _status(404, "NotFound", f"{path} not found")
        if obj.get("kind") in WORKLOAD_KINDS and self.reads[path] >= self.ready_after:
            replicas = obj.get("spec", {}).get("replicas", 1)
            obj["status"] = {
                "observedGeneration": obj["metadata"]["generation"],
                "replicas": replicas,
                "readyReplicas": replicas,
                "updatedReplicas": replicas,
                "availableReplicas": replicas,
            }
        if obj.get("kind") == "Job" and not obj["status"] and self.reads[path] >= self.ready_after:
            self._finish_job(path, obj)
        if obj.get("kind") in WORKLOAD_KINDS and self._is_unready(obj["metadata"]):
            obj["status"] = {**obj.get("status", {}), "readyReplicas": 0, "availableReplicas": 0}
            if obj["kind"] == "Deployment":  # StatefulSets have no Available condition
                obj["status"]["conditions"] = [
                    {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"}
                ]
        return Response(obj)

    def _is_unready(self, meta: dict[str, Any]) -> bool:
        name = meta["name"]
        return name in self.unready or f"{meta.get('namespace')}/{name}" in self.unready

    def _delete(self, path: str) -> Response[Any]:
        obj = self.objects.get(path)
        if obj is None:
            return _status(404, "NotFound", f"{path} not found")
        if obj.get("kind") != "Namespace":
            # Anything but a namespace goes at once.
            del self.objects[path]
            self.applied_configs.pop(path, None)
            return Response(obj, status_code=200)
        obj["status"] = {"phase": "Terminating"}
        self.reads[path] = 0
        return Response(obj, status_code=202)

    def _namespace_missing(self, namespace: str | None) -> bool:
        played = self.reader_role is not None and namespace is not None
        return played and f"/api/v1/namespaces/{namespace}" not in self.objects

    def _may_read(self, namespace: str) -> bool:
        if self.reader_role is None:
            return True
        prefix = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings/"
        return any(
            key.startswith(prefix) and obj.get("roleRef", {}).get("name") == self.reader_role
            for key, obj in self.objects.items()
        )

    def applied(self) -> list[tuple[str, str]]:
        """(kind, name) of every apply, in order."""
        return [
            (r["body"]["kind"], r["body"]["metadata"]["name"])
            for r in self.requests
            if r["method"] == "PATCH"
        ]


def _namespace_inside(path: str) -> str | None:
    """The namespace an object's or collection's path is inside (None for a Namespace itself
    and cluster-scoped kinds)."""
    parts = path.strip("/").split("/")
    if "namespaces" not in parts:
        return None
    at = parts.index("namespaces")
    return parts[at + 1] if len(parts) > at + 2 else None


def _fixed(statefulset: dict[str, Any]) -> dict[str, Any]:
    spec = statefulset.get("spec") or {}
    return {key: value for key, value in spec.items() if key not in STATEFULSET_MUTABLE}


def _merged(base: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """``config`` applied over ``base``: maps merge key by key, anything else is replaced (the
    stand-in treats lists as atomic, which our objects' lists are to their one manager)."""
    merged = copy.deepcopy(base)
    for key, value in config.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _status(code: int, reason: str, message: str) -> Response[Any]:
    return Response(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        },
        status_code=code,
    )


# --- what the tests of the kubernetes backend share around the stand-in ----------------------

STANDIN_TOKEN = KubeStandIn.token


def api_client_for(url: str, token: str = STANDIN_TOKEN) -> Callable[[], Awaitable[k8s.ApiClient]]:
    """The factory the kubernetes backend takes: a client for the API server at ``url`` that
    presents ``token`` (the stand-in's by default) as its bearer token."""

    async def make() -> k8s.ApiClient:
        configuration = k8s.Configuration(host=url)
        configuration.api_key = {"BearerToken": token}
        configuration.api_key_prefix = {"BearerToken": "Bearer"}
        return k8s.ApiClient(configuration)

    return make


def starter_spec(customer_id: str, **fields: Any) -> InstanceSpec:
    """What the backend deploys for a starter customer, its license a placeholder (the
    backend passes it on, never checks it); ``fields`` set any of it otherwise."""
    return InstanceSpec(
        **{
            "customer_id": customer_id,
            "plan": "starter",
            "license_jwt": "header.claims.signature",
            "license_id": "lic-1",
            "jwks_url": "http://licensing.iotistic.svc/.well-known/jwks.json",
        }
        | fields
    )


@contextlib.asynccontextmanager
async def served(standin: KubeStandIn) -> AsyncIterator[str]:
    """The stand-in served in this event loop, and its URL."""
    async with serving(standin.app()) as http:
        yield str(http.base_url)


async def no_progress(percent: int, step: str) -> None:
    """A progress callback that reports nowhere."""
    return None


@contextlib.asynccontextmanager
async def backend_running(backend: KubernetesBackend) -> AsyncIterator[KubernetesBackend]:
    """The backend started, and stopped however the block ends."""
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


@contextlib.asynccontextmanager
async def kube_api(url: str, token: str = STANDIN_TOKEN) -> AsyncIterator[KubeApi]:
    """The backend's API calls to the server at ``url`` without a backend, its client closed
    however the block ends."""
    client = await api_client_for(url, token)()
    try:
        yield KubeApi(client)
    finally:
        await client.close()
