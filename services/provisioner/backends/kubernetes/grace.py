"""Deleting a customer on Kubernetes with a grace period: stop, keep, and purge later.

A deletion without erasure scales the customer's workloads to 0, removes the public route,
suspends the backup CronJob and marks the namespace: the label ``iotistic.io/deleted=true``
(what the purge selects on), the label ``iotistic.io/purge-after`` (epoch seconds) and the
annotations ``iotistic.io/deleted-at`` and ``iotistic.io/purge-after`` (RFC 3339, for people).
The volumes (database, broker, backups) and Secrets stay. A retried deletion keeps the dates it
set first, so retries never extend the grace period.

These changes are applied under a field manager of their own (``iotistic-provisioner-grace``):
server-side apply then removes exactly them when that manager applies an empty object, which is
how a redeploy within the grace period takes the customer back (``take_back``); the main
manager's next apply restores the replicas and the route. ``purge_expired`` deletes the
namespaces whose date has passed, checking each one again just before.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from services.provisioner.backends.base import Progress
from services.provisioner.backends.kubernetes.backups import CRONJOB
from services.provisioner.backends.kubernetes.manifests.gateway import GATEWAY_API
from services.provisioner.backends.kubernetes.manifests.metadata import PART_OF
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings

if TYPE_CHECKING:
    from services.provisioner.backends.kubernetes.api import KubeApi

GRACE_MANAGER = "iotistic-provisioner-grace"
DELETED = "iotistic.io/deleted"
DELETED_AT = "iotistic.io/deleted-at"
PURGE_AFTER = "iotistic.io/purge-after"
WORKLOADS = (
    ("apps/v1", "StatefulSet", "postgres"),
    ("apps/v1", "StatefulSet", "mosquitto"),
    ("apps/v1", "Deployment", "instance"),
)
# The public route(s) of an instance, removed while it is stopped (the main apply recreates
# them): the HTTPRoute on the shared Gateway, and the Ingress of older versions.
ROUTES = (
    (f"{GATEWAY_API}/v1", "HTTPRoute", "instance"),
    ("networking.k8s.io/v1", "Ingress", "instance"),
)
BACKUP_JOB = ("batch/v1", "CronJob", CRONJOB)


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def grace_marks(deleted_at: datetime, grace_days: int) -> tuple[dict[str, str], dict[str, str]]:
    """The namespace's labels and annotations for a deletion at ``deleted_at``."""
    purge_at = deleted_at + timedelta(days=grace_days)
    labels = {DELETED: "true", PURGE_AFTER: str(int(purge_at.timestamp()))}
    annotations = {DELETED_AT: _stamp(deleted_at), PURGE_AFTER: _stamp(purge_at)}
    return labels, annotations


def _partial(api_version: str, kind: str, name: str, ns: str | None, **rest: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if ns is not None:
        meta["namespace"] = ns
    meta.update(rest.pop("metadata", {}))
    return {"apiVersion": api_version, "kind": kind, "metadata": meta, **rest}


async def keep_for_grace(
    api: KubeApi,
    ns: str,
    settings: KubernetesSettings,
    progress: Progress,
    now: datetime | None = None,
) -> None:
    """Stop the namespace's instance and mark it for the purge; idempotent. Nothing to do
    when the namespace is gone (purged, or never made)."""
    namespace = await api.get("v1", "Namespace", ns, None)
    if namespace is None:
        return
    meta = namespace.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    if labels.get(DELETED) == "true" and DELETED_AT in annotations:
        # A retry: the first attempt's dates stand.
        deleted_at = datetime.fromisoformat(annotations[DELETED_AT].replace("Z", "+00:00"))
    else:
        deleted_at = now or datetime.now(UTC)
    new_labels, new_annotations = grace_marks(deleted_at, settings.deletion_grace_days)
    await progress(10, "stopping the instance")
    for api_version, kind, name in WORKLOADS:
        if await api.get(api_version, kind, name, ns) is not None:
            await api.apply(
                _partial(api_version, kind, name, ns, spec={"replicas": 0}), GRACE_MANAGER
            )
    api_version, kind, name = BACKUP_JOB
    if await api.get(api_version, kind, name, ns) is not None:
        await api.apply(
            _partial(api_version, kind, name, ns, spec={"suspend": True}), GRACE_MANAGER
        )
    await progress(40, "removing the public route")
    for api_version, kind, name in ROUTES:
        await api.delete(api_version, kind, name, ns)
    await progress(70, "marking the namespace for the purge")
    await api.apply(
        _partial(
            "v1",
            "Namespace",
            ns,
            None,
            metadata={"labels": new_labels, "annotations": new_annotations},
        ),
        GRACE_MANAGER,
    )


async def take_back(api: KubeApi, ns: str) -> bool:
    """Undo a grace-period deletion before the customer's objects are applied again: the
    grace manager's fields (marks, replicas 0, suspension) are removed by applying empty
    objects. False when the namespace was not marked (nothing done)."""
    namespace = await api.get("v1", "Namespace", ns, None)
    labels = ((namespace or {}).get("metadata") or {}).get("labels") or {}
    if labels.get(DELETED) != "true":
        return False
    for api_version, kind, name in (*WORKLOADS, BACKUP_JOB):
        if await api.get(api_version, kind, name, ns) is not None:
            await api.apply(_partial(api_version, kind, name, ns), GRACE_MANAGER)
    await api.apply(_partial("v1", "Namespace", ns, None), GRACE_MANAGER)
    return True


def kept_until(namespace: dict[str, Any] | None) -> str | None:
    """When a namespace marked by a deletion is purged (RFC 3339), or None when unmarked."""
    meta = (namespace or {}).get("metadata") or {}
    if (meta.get("labels") or {}).get(DELETED) != "true":
        return None
    return str((meta.get("annotations") or {}).get(PURGE_AFTER, "unknown"))


def _purge_due(namespace: dict[str, Any], now: datetime) -> bool:
    meta = namespace.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(DELETED) != "true" or labels.get("app.kubernetes.io/part-of") != PART_OF:
        return False
    if (namespace.get("status") or {}).get("phase") == "Terminating":
        return False
    try:
        return int(labels.get(PURGE_AFTER, "")) <= now.timestamp()
    except ValueError:
        return False  # a mark we did not write: leave it to a person


async def purge_expired(api: KubeApi, now: datetime | None = None) -> list[str]:
    """Delete every marked namespace whose grace period is over; their names."""
    moment = now or datetime.now(UTC)
    selector = f"{DELETED}=true,app.kubernetes.io/part-of={PART_OF}"
    purged = []
    for namespace in await api.list("v1", "Namespace", None, selector):
        name = (namespace.get("metadata") or {}).get("name", "")
        if not name or not _purge_due(namespace, moment):
            continue
        # Read again just before: a redeploy may have taken it back since the list.
        current = await api.get("v1", "Namespace", name, None)
        if current is None or not _purge_due(current, moment):
            continue
        await api.delete("v1", "Namespace", name, None)
        purged.append(name)
    return purged
