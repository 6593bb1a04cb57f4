"""The tenant's Namespace, and what bounds it: its quota and container defaults, the record of
whose it is, and the worker's reads in it."""

from __future__ import annotations

from typing import Any

from services.provisioner.backends.kubernetes.manifests.metadata import (
    CREDENTIALS_GENERATION,
    CUSTOMER_ANNOTATION,
    SECRET_FINGERPRINT,
    object_meta,
)
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings
from services.provisioner.backends.kubernetes.storage import TenantStorage

# Pod Security "restricted", enforced on every tenant namespace (the chart's Gateway admits
# routes from namespaces labelled as tenants, and its admission policy requires both).
NAMESPACE_LABELS = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
    "pod-security.kubernetes.io/audit": "restricted",
    "pod-security.kubernetes.io/audit-version": "latest",
    "pod-security.kubernetes.io/warn": "restricted",
    "pod-security.kubernetes.io/warn-version": "latest",
    "iotistic.io/tenant": "true",
}
READER_BINDING = "iotistic-provisioner-reads"


def tenant_namespace(
    ns: str, cid: str, credentials_generation: int, secret_fingerprint: str
) -> dict[str, Any]:
    """The Namespace ``ns``: Pod Security "restricted", labelled a tenant, recording whose it is,
    the customer's credentials generation and which secret their passwords derive from."""
    meta = object_meta(
        ns,
        None,
        cid,
        labels=dict(NAMESPACE_LABELS),
        annotations={
            CREDENTIALS_GENERATION: str(credentials_generation),
            CUSTOMER_ANNOTATION: cid,
            **({SECRET_FINGERPRINT: secret_fingerprint} if secret_fingerprint else {}),
        },
    )
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def namespace_owner_conflict(namespace: dict[str, Any] | None, customer_id: str) -> str | None:
    """Why the existing ``namespace`` is not ``customer_id``'s (it records another customer:
    their ids map to one name, e.g. cut short by a long prefix), or None when it is theirs or
    records nobody (made before the record, or not yet made)."""
    meta = (namespace or {}).get("metadata") or {}
    owner = (meta.get("annotations") or {}).get(CUSTOMER_ANNOTATION)
    if owner is None or owner == customer_id:
        return None
    return (
        f"namespace {meta.get('name', '?')} belongs to customer {str(owner)[:80]!r}, "
        f"not {customer_id[:80]!r}: their ids map to one name"
    )


def secret_conflict(namespace: dict[str, Any] | None, fingerprint: str) -> str | None:
    """Why ``namespace``'s objects were applied with another PROVISIONER_SECRET than the one
    of ``fingerprint``, or None (the same, or not recorded)."""
    meta = (namespace or {}).get("metadata") or {}
    recorded = (meta.get("annotations") or {}).get(SECRET_FINGERPRINT)
    if recorded is None or recorded == fingerprint:
        return None
    return (
        f"namespace {meta.get('name', '?')} was applied with another PROVISIONER_SECRET than "
        "this one: applying would give the customer passwords their broker has never had "
        "(use the provisioner's own secret)"
    )


def reader_binding(
    ns: str, customer_id: str, settings: KubernetesSettings
) -> dict[str, Any] | None:
    """The RoleBinding that lets the provisioner's worker read in the tenant's namespace ``ns``
    (its workloads, volumes, CronJob, Jobs and their pods: the reader ClusterRole of the chart,
    bound here only), or None without ``settings.tenant_reader``. The worker's own ClusterRole
    holds no read of those kinds, so nothing of another namespace is readable to it; the
    admission policy admits this RoleBinding, with exactly this role and subject, only in
    tenant namespaces."""
    if settings.tenant_reader is None:
        return None
    role, sa_namespace, sa_name = settings.tenant_reader
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": object_meta(READER_BINDING, ns, customer_id),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": sa_name, "namespace": sa_namespace}],
    }


def quota(ns: str, cid: str, storage: TenantStorage) -> dict[str, Any]:
    """The namespace's ResourceQuota: 4 CPU, 4Gi, and the plan's storage."""
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": object_meta("customer-quota", ns, cid),
        "spec": {
            "hard": {
                "requests.cpu": "4",
                "requests.memory": "4Gi",
                "limits.cpu": "4",
                "limits.memory": "4Gi",
                "persistentvolumeclaims": "4",
                # The data, backups and broker volumes (storage.keep_grown raises it
                # where a volume is bigger than its plan's size).
                "requests.storage": f"{storage.total_gib}Gi",
            }
        },
    }


def limits(ns: str, cid: str) -> dict[str, Any]:
    """The LimitRange: what a container gets when it does not say, and at most."""
    return {
        "apiVersion": "v1",
        "kind": "LimitRange",
        "metadata": object_meta("container-defaults", ns, cid),
        "spec": {
            "limits": [
                {
                    "type": "Container",
                    "default": {"cpu": "500m", "memory": "512Mi"},
                    "defaultRequest": {"cpu": "100m", "memory": "128Mi"},
                    "max": {"cpu": "2", "memory": "2Gi"},
                }
            ]
        },
    }
