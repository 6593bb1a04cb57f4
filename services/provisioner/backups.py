"""The restore drill on Kubernetes: a Job in the tenant's namespace restores the newest dump
into a scratch database, counts its tables' rows, checks the dump's checksum, and drops the
scratch database (``tenant_backup/drill.sh``); this waits for the Job and reads its summary,
which the script leaves as the container's termination message.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from services.provisioner.backends.base import BackendError
from services.provisioner.backends.k8s_backups import drill_job
from services.provisioner.backends.k8s_manifests import KubernetesSettings, _meta, namespace_of

if TYPE_CHECKING:
    from services.provisioner.backends.k8s import KubeApi


@dataclass(frozen=True)
class DrillResult:
    """How one drill went: the Job, whether it succeeded, and what the script said."""

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
    ns = namespace_of(customer_id, settings)
    if await api.get("v1", "Namespace", ns, None) is None:
        raise BackendError(f"no namespace {ns}: customer {customer_id} is not deployed here")
    name = f"restore-drill-{(now or datetime.now(UTC)):%Y%m%d-%H%M%S}"
    await api.apply(drill_job(_meta(name, ns, customer_id), settings.postgres_image))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (outcome := job_outcome(await api.get("batch/v1", "Job", name, ns))) is None:
        if loop.time() > deadline:
            raise BackendError(f"the restore drill {ns}/{name} did not end in {timeout:.0f}s")
        await asyncio.sleep(poll)
    pods = await api.list("v1", "Pod", ns, f"job-name={name}")
    return DrillResult(name, ns, outcome, termination_message(pods))
