"""What the tenant's workloads share: their pods' security, their volume claims, their
Services and the shape of a StatefulSet of one pod."""

from __future__ import annotations

import copy
from typing import Any

from services.provisioner.backends.kubernetes.manifests.metadata import object_meta
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings

RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
    "readOnlyRootFilesystem": True,
}
# No pod of a tenant talks to the Kubernetes API, and none needs the services' env variables
# (which would also put e.g. INSTANCE_PORT=tcp://... into the instance's environment).
NO_CLUSTER_ACCESS = {"automountServiceAccountToken": False, "enableServiceLinks": False}
# Readable by the pod's group (its fsGroup) only.
SECRET_FILE_MODE = 0o440


def pod_security(uid: int) -> dict[str, Any]:
    """The pod's security context: a non-root user and group of its own, the volumes' group,
    the runtime's seccomp profile for every container."""
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def restricted() -> dict[str, Any]:
    """The restricted container security context (no privileges, no capabilities, read-only
    root, RuntimeDefault seccomp)."""
    # A copy each time: one dict shared by two containers would be written as a YAML alias.
    return copy.deepcopy(RESTRICTED)


def secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict[str, Any]:
    """The env variable ``name`` from the ``key`` of the Secret ``secret``."""
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def claim_spec(size: str, settings: KubernetesSettings) -> dict[str, Any]:
    """A ReadWriteOnce claim of ``size``, in the settings' StorageClass."""
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": size}},
    }
    if settings.storage_class:
        spec["storageClassName"] = settings.storage_class
    return spec


def service(
    name: str, ns: str, cid: str, ports: list[dict[str, Any]], headless: bool = False
) -> dict[str, Any]:
    """The Service ``name`` in front of the pods labelled ``app.kubernetes.io/name: <name>``;
    ``headless``: without a cluster address (a StatefulSet's)."""
    spec: dict[str, Any] = {"selector": {"app.kubernetes.io/name": name}, "ports": ports}
    if headless:
        spec["clusterIP"] = "None"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(name, ns, cid, labels={"app.kubernetes.io/name": name}),
        "spec": spec,
    }


def stateful_set(
    name: str,
    ns: str,
    cid: str,
    annotations: dict[str, str],
    pod: dict[str, Any],
    claim: dict[str, Any],
) -> dict[str, Any]:
    """The StatefulSet ``name`` of one pod (labelled ``app.kubernetes.io/name: <name>``, its
    template annotated with ``annotations``, ``pod`` its spec), with a "data" volume of
    ``claim``; its Service is ``name`` too."""
    labels = {"app.kubernetes.io/name": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": object_meta(name, ns, cid, labels=dict(labels)),
        "spec": {
            "serviceName": name,
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels, "annotations": annotations}, "spec": pod},
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": claim}],
        },
    }
