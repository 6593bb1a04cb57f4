"""PROVISIONER_WORKER: the web-facing provisioner and the worker that applies, apart.

On Kubernetes the provisioner's public pods run with ``PROVISIONER_WORKER=false`` and no
service-account token; a separate worker Deployment (no Service) holds the cluster rights. Here,
on real Postgres and NATS, a provisioner with the setting off serves its routes and projections,
queues the customer's deploy, and never makes a call to the backend or claims the job; a second
provisioner on the same database and log with the setting on claims it and applies it. The
Kubernetes API is the labelled STAND-IN (tests/k8s_standin.py), since no API server runs here;
both processes are handed a backend on it, so a call from the web-facing one would show.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from k8s_standin import KubeStandIn, api_client_for, served

from libs.config import ServiceSettings
from libs.runtime.platform import Platform
from services.provisioner.app import NOT_APPLYING, PROVISIONER, worker_of
from services.provisioner.backends.kubernetes.backend import KubernetesBackend
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings
from services.targets import build_app
from support import eventually, serving, signed_license_issued

pytestmark = pytest.mark.slow

SECRET = "p" * 40
# The tasks only a process that applies runs (each would call the backend).
APPLYING_TASKS = {"queue worker", "capacity", "health watch"}


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[KubeStandIn, str]]:
    standin = KubeStandIn(ready_after=1)
    async with served(standin) as url:
        yield standin, url


def standin_backend(url: str, token: str) -> KubernetesBackend:
    """The real kubernetes backend, its client pointed at the stand-in."""

    return KubernetesBackend(
        KubernetesSettings(),
        SECRET.encode(),
        api_client_for(url, token),
        ready_timeout=20,
        poll_seconds=0.05,
    )


def provisioner(settings: ServiceSettings, cluster_url: str, token: str, worker: bool) -> Platform:
    """A provisioner-only process as the chart runs it, with the backend it would use."""
    platform = Platform.from_settings(
        settings,
        [PROVISIONER],
        provisioner_backend="kubernetes",
        provisioner_secret=SECRET,
        provisioner_worker=worker,
        queue_poll_seconds=0.05,
        capacity_check_seconds=0.2,
    )
    runtime = platform.runtime_of("provisioner")
    runtime.shared("backend", lambda: standin_backend(cluster_url, token))
    return platform


@contextlib.asynccontextmanager
async def started(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(build_app(platform, "provisioner")) as http:
        await platform.wait_started()
        yield http


async def customer_jobs(
    http: httpx.AsyncClient, admin: dict[str, str], customer_id: str
) -> list[dict[str, Any]]:
    response = await http.get(f"/api/queue/customer/{customer_id}/jobs", headers=admin)
    assert response.status_code == 200, response.text
    jobs: list[dict[str, Any]] = response.json()["jobs"]
    return jobs


async def test_only_the_worker_applies_what_the_web_facing_provisioner_queued(
    fresh_log: Any, cluster: tuple[KubeStandIn, str]
) -> None:
    standin, url = cluster
    settings, store = await fresh_log()
    admin = {"Authorization": f"Bearer {settings.admin_token}"}
    customer_id = str(uuid.uuid4())
    web = provisioner(settings, url, standin.token, worker=False)

    async with started(web) as http:
        tasks = set(web.runtime_of("provisioner").supervisor.tasks)
        assert not tasks & APPLYING_TASKS, tasks
        assert "outbox" in " ".join(tasks), tasks  # its routes' events still reach the log

        await store.publish(signed_license_issued(customer_id), customer_id=customer_id)
        [job] = await eventually(
            lambda: customer_jobs(http, admin, customer_id),
            lambda jobs: len(jobs) == 1,
            what="the deploy queued by the web-facing provisioner's reactor",
        )
        assert job["state"] == "waiting" and job["attempts"] == 0

        # Ready without a backend, once its consumers have attached.
        ready = await eventually(
            lambda: http.get("/health/ready"),
            lambda r: r.status_code == 200,
            what="the web-facing provisioner ready",
        )
        assert ready.json()["services"]["provisioner"]["worker"] == NOT_APPLYING

        # Its routes answer from the projections, and say why the backend's view is missing.
        status = await http.get(f"/api/customers/{customer_id}/deployment/status", headers=admin)
        assert status.status_code == 200, status.text
        shown = status.json()
        assert shown["customer"]["deploymentStatus"] == "pending"
        assert shown["backend"]["name"] == "kubernetes"
        assert "PROVISIONER_WORKER=false" in shown["backend"]["unavailable"]
        assert shown["components"] == []

        # An admin's deploy is queued too (the same job: one deploy per customer pending).
        queued = await http.post(f"/api/customers/{customer_id}/deploy", headers=admin)
        assert queued.status_code == 202, queued.text

        # A bounded look at a negative: many poll intervals (0.05 s) pass, nothing is claimed
        # and the cluster is never called.
        await asyncio.sleep(1.0)
        jobs = await customer_jobs(http, admin, customer_id)
        assert {j["state"] for j in jobs} == {"waiting"}, jobs
        assert all(j["attempts"] == 0 and j["attemptsLog"] == [] for j in jobs), jobs
        assert standin.requests == []

        # The worker, on the same database and log, takes the job and applies it.
        worker = provisioner(settings, url, standin.token, worker=True)
        async with started(worker):
            worker_tasks = set(worker.runtime_of("provisioner").supervisor.tasks)
            assert worker_tasks >= APPLYING_TASKS, worker_tasks
            done = await eventually(
                lambda: customer_jobs(http, admin, customer_id),
                lambda jobs: any(j["state"] == "completed" for j in jobs),
                timeout=30,
                what="the worker's deploy completed",
            )
            worker_id = worker_of(worker.runtime_of("provisioner")).worker_id
            completed = next(j for j in done if j["state"] == "completed")
            assert {a["worker"] for a in completed["attemptsLog"]} == {worker_id}
            applied = [r["path"] for r in standin.requests if r["method"] == "PATCH"]
            assert any(p.endswith(f"api/v1/namespaces/customer-{customer_id}") for p in applied)

            # The web-facing one shows the outcome, from the log.
            status = await eventually(
                lambda: http.get(f"/api/customers/{customer_id}/deployment/status", headers=admin),
                lambda r: r.json()["customer"]["deploymentStatus"] == "deployed",
                what="the web-facing provisioner shows the instance deployed",
            )
            assert "PROVISIONER_WORKER=false" in status.json()["backend"]["unavailable"]


async def test_a_backend_that_cannot_tell_leaves_the_status_answering(
    fresh_log: Any, cluster: tuple[KubeStandIn, str]
) -> None:
    # The cluster refuses every call (as it would a token without the rights).
    standin, url = cluster
    standin.fail_status = 403
    settings, store = await fresh_log()
    admin = {"Authorization": f"Bearer {settings.admin_token}"}
    customer_id = str(uuid.uuid4())
    worker = provisioner(settings, url, standin.token, worker=True)
    async with started(worker) as http:
        await store.publish(signed_license_issued(customer_id), customer_id=customer_id)
        status = await eventually(
            lambda: http.get(f"/api/customers/{customer_id}/deployment/status", headers=admin),
            lambda r: r.status_code != 404,
            what="the customer known to the provisioner",
        )
        assert status.status_code == 200, status.text
        backend = status.json()["backend"]
        assert backend["name"] == "kubernetes" and backend["release"] is None
        assert "Kubernetes refused" in backend["unavailable"] and "403" in backend["unavailable"]


async def test_an_erasure_asked_over_http_reaches_the_queued_removal(
    fresh_log: Any, cluster: tuple[KubeStandIn, str]
) -> None:
    # The web-facing provisioner only queues: the removal waits, with what was asked of it.
    standin, url = cluster
    settings, store = await fresh_log()
    admin = {"Authorization": f"Bearer {settings.admin_token}"}
    keeping, erasing = str(uuid.uuid4()), str(uuid.uuid4())
    web = provisioner(settings, url, standin.token, worker=False)
    async with started(web) as http:
        for customer_id in (keeping, erasing):
            await store.publish(signed_license_issued(customer_id), customer_id=customer_id)
            await eventually(
                lambda c=customer_id: customer_jobs(http, admin, c),
                lambda jobs: len(jobs) == 1,
                what="the deploy queued",
            )
        unclear = await http.delete(
            f"/api/customers/{erasing}/deployment?erase=maybe", headers=admin
        )
        assert unclear.status_code == 400, unclear.text
        assert "erase" in unclear.text and "Traceback" not in unclear.text
        kept = await http.delete(f"/api/customers/{keeping}/deployment", headers=admin)
        erased = await http.delete(f"/api/customers/{erasing}/deployment?erase=true", headers=admin)
        assert kept.status_code == erased.status_code == 202, (kept.text, erased.text)
        assert kept.json()["data"].get("erase", False) is False
        assert erased.json()["data"]["erase"] is True
        removals = [j for j in await customer_jobs(http, admin, erasing) if j["data"].get("erase")]
        assert len(removals) == 1 and removals[0]["state"] == "waiting"
        assert standin.requests == []  # nothing was applied or deleted from the web pods
