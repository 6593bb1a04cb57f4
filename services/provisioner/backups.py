"""The restore drill and the restore on Kubernetes, each a Job in the tenant's namespace.

The drill restores the newest dump into a scratch database, counts its tables' rows, checks the
dump's checksum and its broker copy's, and drops the scratch database
(``tenant_backup/drill.sh``). The restore puts a dump back over the tenant's own database
(``restore.sh`` with ``RESTORE_CLEAN=1``), and its copy of the broker's dynamic-security file
back into the broker's volume, while the instance and the broker are scaled to 0 (under a field
manager of its own that lets go of the replicas after): Mosquitto reads that file only at its
start, and the restore Job can mount the broker's ReadWriteOnce volume only once the broker's
pod is gone.
Both wait for their Job and read its summary, which the script leaves as the container's
termination message.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from services.provisioner.backends.base import BackendError
from services.provisioner.backends.kubernetes.backups import BROKER_LABELS, drill_job, restore_job
from services.provisioner.backends.kubernetes.manifests.metadata import namespace_of
from services.provisioner.backends.kubernetes.manifests.metadata import object_meta as _meta
from services.provisioner.backends.kubernetes.manifests.postgres_scripts import PG_SUPERUSER
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings

if TYPE_CHECKING:
    from services.provisioner.backends.kubernetes.api import KubeApi


RESTORE_MANAGER = "iotistic-provisioner-restore"
INSTANCE_LABELS = {"app.kubernetes.io/name": "instance"}


@dataclass(frozen=True)
class DrillResult:
    """How one drill (or restore) went: the Job, whether it succeeded, what the script said."""

    job: str
    namespace: str
    succeeded: bool
    summary: str


def job_outcome(job: dict[str, Any] | None) -> bool | None:
    """True when the Job completed, False when it failed, None while it runs."""
    for condition in ((job or {}).get("status") or {}).get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return True
        if condition.get("type") == "Failed":
            return False
    return None


def termination_message(pods: list[dict[str, Any]]) -> str:
    """The drill container's termination message (the script's last line), if any pod has
    one: the newest pod's first."""
    for pod in reversed(pods):
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            message = ((status.get("state") or {}).get("terminated") or {}).get("message")
            if message:
                return str(message).strip()
    return ""


async def run_restore_drill(
    api: KubeApi,
    customer_id: str,
    settings: KubernetesSettings,
    timeout: float,
    poll: float,
    now: datetime | None = None,
) -> DrillResult:
    """Apply the drill Job in the customer's namespace, wait for it (``timeout`` seconds at
    most), and report. Raises ``BackendError`` when there is no such namespace or it does not
    end in time (the Job keeps running; ``kubectl -n <ns> logs job/<name>`` shows it)."""
    ns = await _namespace(api, customer_id, settings)
    name = f"restore-drill-{(now or datetime.now(UTC)):%Y%m%d-%H%M%S}"
    job = drill_job(_meta(name, ns, customer_id), settings.postgres_image, PG_SUPERUSER)
    return await _run_job(api, ns, job, timeout, poll)


async def run_restore(
    api: KubeApi,
    customer_id: str,
    settings: KubernetesSettings,
    timeout: float,
    poll: float,
    dump: str | None = None,
    now: datetime | None = None,
) -> DrillResult:
    """Put a dump (the newest intact one, or ``dump``) back over the customer's database, and
    its copy of the broker's dynamic-security file into the broker's volume: the instance and
    the broker are scaled to 0 for it (the Job starts once their pods are gone) and let go of
    after, whatever happened; the database's restore is one transaction, so a failed one leaves
    the database as it was, and the broker's file is replaced only after it."""
    ns = await _namespace(api, customer_id, settings)
    name = f"restore-{(now or datetime.now(UTC)):%Y%m%d-%H%M%S}"
    job = restore_job(_meta(name, ns, customer_id), settings.postgres_image, dump)
    stopped = [
        ({"apiVersion": "apps/v1", "kind": "Deployment"}, "instance", INSTANCE_LABELS),
        ({"apiVersion": "apps/v1", "kind": "StatefulSet"}, "mosquitto", BROKER_LABELS),
    ]
    workloads = [{**kind, "metadata": {"name": n, "namespace": ns}} for kind, n, _ in stopped]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        for workload in workloads:
            await api.apply({**workload, "spec": {"replicas": 0}}, RESTORE_MANAGER)
        for _, workload_name, labels in stopped:
            selector = ",".join(f"{k}={v}" for k, v in labels.items())
            while await api.list("v1", "Pod", ns, selector):
                if loop.time() > deadline:
                    raise BackendError(
                        f"the pods of {ns}/{workload_name} did not stop in {timeout:.0f}s"
                    )
                await asyncio.sleep(poll)
        return await _run_job(api, ns, job, max(deadline - loop.time(), poll), poll)
    finally:
        # Gives up the replicas: each workload goes back to its default (one), and the
        # provisioner's next apply owns them again. The broker first: the instance converges
        # its devices on it at start.
        for workload in reversed(workloads):
            await api.apply(workload, RESTORE_MANAGER)


async def _namespace(api: KubeApi, customer_id: str, settings: KubernetesSettings) -> str:
    ns = namespace_of(customer_id, settings)
    if await api.get("v1", "Namespace", ns, None) is None:
        raise BackendError(f"no namespace {ns}: customer {customer_id} is not deployed here")
    return ns


async def _run_job(
    api: KubeApi, ns: str, job: dict[str, Any], timeout: float, poll: float
) -> DrillResult:
    name = job["metadata"]["name"]
    await api.apply(job)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (outcome := job_outcome(await api.get("batch/v1", "Job", name, ns))) is None:
        if loop.time() > deadline:
            raise BackendError(f"the Job {ns}/{name} did not end in {timeout:.0f}s")
        await asyncio.sleep(poll)
    pods = await api.list("v1", "Pod", ns, f"job-name={name}")
    return DrillResult(name, ns, outcome, termination_message(pods))
