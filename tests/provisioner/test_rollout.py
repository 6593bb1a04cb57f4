"""The fleet rollout (``iotistic provisioner rollout``) against the STAND-IN of the Kubernetes API
server (tests/k8s_standin.py; no API server can run here), with a real queue worker on real
Postgres and the log on real NATS JetStream.

Five customers deployed with one instance image; the provisioner restarted with a new one; the
rollout then queues an update per customer in batches, each behind a health gate, stops at a
customer whose instance does not become ready (the rest of the fleet untouched), and, run again
once that is fixed, carries on where it stopped: customers already on the new manifests are
skipped. The second run goes through the command itself, with a kubeconfig for the stand-in.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
import yaml
from k8s_standin import STANDIN_TOKEN, KubeStandIn, api_client_for, backend_running, served
from prometheus_client import CollectorRegistry

from contracts import LicenseIssued, decode_envelope, decode_event
from libs.eventlog.store import EventStore, traced_envelope
from libs.projections.apply import Recorded
from libs.runtime.outbox import OutboxRelay
from services.provisioner.app import kubernetes_settings
from services.provisioner.backends.base import InstanceSpec
from services.provisioner.backends.kubernetes.backend import KubernetesBackend
from services.provisioner.backends.kubernetes.manifests.render import render
from services.provisioner.metrics import QueueMetrics
from services.provisioner.reactors import provisioner_reactors
from services.provisioner.rollout import (
    USER_AGENT,
    Rollout,
    RolloutBusy,
    kubernetes_backend,
    plan_rollout,
)
from services.provisioner.settings import ProvisionerSettings
from services.provisioner.worker import QueueWorker
from support import eventually, license_issued

pytestmark = pytest.mark.slow

OLD_IMAGE = "ghcr.io/iotistic/iotistic:0.1.0"
NEW_IMAGE = "ghcr.io/iotistic/iotistic:0.2.0"
SECRET = "r" * 40


def provisioner_settings(database_url: str, image: str) -> ProvisionerSettings:
    # One attempt per job and a short readiness bound: a broken instance fails its job fast.
    return ProvisionerSettings(
        database_url=database_url,
        provisioner_backend="kubernetes",
        provisioner_secret=SECRET,
        instance_image=image,
        queue_max_retries=1,
        kubernetes_ready_timeout_seconds=3,
    )


@contextlib.asynccontextmanager
async def provisioner_worker(
    pool: asyncpg.Pool, settings: ProvisionerSettings, url: str, store: EventStore
) -> AsyncIterator[OutboxRelay]:
    """The provisioner's queue worker with the kubernetes backend as the app builds it, as a
    provisioner replica runs it; stopped on leaving (a restart, with new settings)."""
    backend = KubernetesBackend(
        kubernetes_settings(settings),
        SECRET.encode(),
        api_client_for(url),
        ready_timeout=settings.kubernetes_ready_timeout_seconds,
        poll_seconds=0.05,
    )
    relay = OutboxRelay(lambda: pool, lambda: store, "provisioner:outbox")
    worker = QueueWorker(lambda: pool, settings, backend, relay, QueueMetrics(CollectorRegistry()))
    task = asyncio.create_task(worker.run())
    try:
        yield relay
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def license_customer(pool: asyncpg.Pool, event: LicenseIssued) -> None:
    """What the provisioner's reactor does when the license reaches it: queue the deploy."""
    [reactor] = provisioner_reactors(1, lambda: None)
    envelope = traced_envelope(event, customer_id=event.customer_id)
    async with pool.acquire() as conn, conn.transaction():
        await reactor.handlers[LicenseIssued](conn, Recorded(1, envelope, event))


async def all_jobs_finished(pool: asyncpg.Pool) -> bool:
    return not await pool.fetchval(
        "SELECT count(*) FROM queue_jobs WHERE state IN ('waiting', 'delayed', 'active')"
    )


async def license_and_deploy(pool: asyncpg.Pool, *events: LicenseIssued) -> None:
    """Each customer licensed, and the worker's deploys of them all finished."""
    for event in events:
        await license_customer(pool, event)
    await eventually(lambda: all_jobs_finished(pool), timeout=60, what="deploys")


def image_of(standin: KubeStandIn, customer_id: str) -> str:
    deployment = standin.objects[
        f"/apis/apps/v1/namespaces/customer-{customer_id}/deployments/instance"
    ]
    return str(deployment["spec"]["template"]["spec"]["containers"][0]["image"])


def touches(request: dict[str, Any], customer_id: str) -> bool:
    return f"namespaces/customer-{customer_id}" in request["path"]


def first(requests: list[dict[str, Any]], method: str, customers: list[str], **where: str) -> int:
    """Index of the first request of ``method`` about any of ``customers``."""
    return next(
        i
        for i, r in enumerate(requests)
        if r["method"] == method
        and any(touches(r, c) for c in customers)
        and all(r.get(k) == v for k, v in where.items())
    )


def last(requests: list[dict[str, Any]], method: str, customers: list[str], **where: str) -> int:
    return max(
        i
        for i, r in enumerate(requests)
        if r["method"] == method
        and any(touches(r, c) for c in customers)
        and all(r.get(k) == v for k, v in where.items())
    )


async def run_command(*args: str, env: dict[str, str]) -> tuple[int, str]:
    command = str(Path(sys.executable).parent / "iotistic")
    process = await asyncio.create_subprocess_exec(
        command,
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, output.decode()


def command_env(database_url: str, url: str, folder: Path) -> dict[str, str]:
    kubeconfig = folder / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "standin", "cluster": {"server": url}}],
                "users": [{"name": "provisioner", "user": {"token": STANDIN_TOKEN}}],
                "contexts": [
                    {"name": "standin", "context": {"cluster": "standin", "user": "provisioner"}}
                ],
                "current-context": "standin",
            }
        )
    )
    return {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),  # this checkout's code
        "KUBECONFIG": str(kubeconfig),
        "DATABASE_URL": database_url,
        "PROVISIONER_BACKEND": "kubernetes",
        "PROVISIONER_SECRET": SECRET,
        "INSTANCE_IMAGE": NEW_IMAGE,
        "QUEUE_MAX_RETRIES": "1",
    }


async def test_a_new_image_rolls_out_in_gated_batches_stops_at_a_broken_one_and_resumes(
    pool: asyncpg.Pool, provisioner_database: str, store: EventStore, tmp_path: Path
) -> None:
    standin = KubeStandIn()
    async with served(standin) as url:
        # Four starter customers and one enterprise one, each from a trial license only.
        starters = sorted(str(uuid.uuid4()) for _ in range(4))
        enterprise = str(uuid.uuid4())
        old = provisioner_settings(provisioner_database, OLD_IMAGE)
        async with provisioner_worker(pool, old, url, store):
            await license_and_deploy(
                pool,
                *(license_issued(c) for c in starters),
                license_issued(enterprise, plan="enterprise"),
            )
        everyone = [*starters, enterprise]
        assert {image_of(standin, c) for c in everyone} == {OLD_IMAGE}

        new = provisioner_settings(provisioner_database, NEW_IMAGE)
        env = command_env(provisioner_database, url, tmp_path)
        cli = ("--data-dir", str(tmp_path), "provisioner", "rollout")
        # The provisioner restarts with the new image (a helm upgrade): nothing rolls yet.
        async with provisioner_worker(pool, new, url, store) as relay:
            jobs_before = await pool.fetchval("SELECT count(*) FROM queue_jobs")
            requests_before = len(standin.requests)
            code, out = await run_command(*cli, "--dry-run", "--batch-size", "2", env=env)
            assert code == 0, out
            # Trials (starter) first, enterprise last; a canary of one, then batches of two.
            assert f"batch 1: {starters[0]} (starter)" in out, out
            assert f"batch 2: {starters[1]} (starter) {starters[2]} (starter)" in out, out
            assert f"batch 3: {starters[3]} (starter) {enterprise} (enterprise)" in out, out
            assert await pool.fetchval("SELECT count(*) FROM queue_jobs") == jobs_before
            assert not any(r["method"] == "PATCH" for r in standin.requests[requests_before:])

            # The third customer's new instance will not become ready.
            broken = starters[2]
            standin.unready = {f"customer-{broken}/instance"}
            backend = kubernetes_backend(new, api_client_for(url))
            async with backend_running(backend):
                plan = await plan_rollout(pool, backend, new, batch_size=2, canary=1)
                assert [[t.customer_id for t in b] for b in plan.batches] == [
                    [starters[0]],
                    starters[1:3],
                    [starters[3], enterprise],
                ]
                started = len(standin.requests)
                report = await Rollout(
                    pool, backend, new, batch_timeout=30, settle_seconds=0.2, poll_seconds=0.05
                ).run(plan)
            assert report.stopped
            assert [(f.customer_id, f.reason) for f in report.failures] == [
                (broken, "job failed: not ready after 3s: instance")
            ]
            assert report.updated == [starters[0], starters[1]]
            assert report.untouched == [starters[3], enterprise]
            requests = standin.requests[started:]
            # Batch 2 began only once the canary's update was applied and the rollout's own
            # health gate had found it healthy.
            canary_gate = last(requests, "GET", [starters[0]], user_agent=USER_AGENT)
            assert last(requests, "PATCH", [starters[0]]) < canary_gate
            assert canary_gate < first(requests, "PATCH", starters[1:3])
            # The batches after the failure were never touched.
            assert not any(touches(r, c) for r in requests for c in [starters[3], enterprise])
            assert {c: image_of(standin, c) for c in everyone} == {
                starters[0]: NEW_IMAGE,
                starters[1]: NEW_IMAGE,
                broken: NEW_IMAGE,  # applied, but not ready: not stamped, so not done
                starters[3]: OLD_IMAGE,
                enterprise: OLD_IMAGE,
            }

            # Fixed (a node drained, say): run again; it carries on where it stopped.
            standin.unready = set()
            rerun_from = len(standin.requests)
            code, out = await run_command(
                *cli,
                "--batch-size",
                "2",
                "--settle-seconds",
                "0.2",
                "--poll-seconds",
                "0.05",
                env=env,
            )
            assert code == 0, out
            assert f"up to date: {starters[0]}" in out and f"up to date: {starters[1]}" in out
            assert f"batch 1: {broken} (starter)" in out, out
            assert f"batch 2: {starters[3]} (starter) {enterprise} (enterprise)" in out, out
            assert "3 updated, 0 failed" in out, out
            rerun = standin.requests[rerun_from:]
            assert not any(
                r["method"] == "PATCH" and touches(r, c) for r in rerun for c in starters[:2]
            )
            # The new image reached everyone, trial customers included.
            assert {image_of(standin, c) for c in everyone} == {NEW_IMAGE}
            # Every object was applied again, not only the license and the instance; the
            # instance rolled with its old pod gone first (one broker client id, one pod).
            kinds = {
                r["body"]["kind"] for r in rerun if r["method"] == "PATCH" and touches(r, broken)
            }
            every = InstanceSpec(
                customer_id=broken, plan="starter", license_jwt="j", license_id="l", jwks_url="u"
            )
            assert kinds == {o["kind"] for o in render(every, kubernetes_settings(new), "p")}
            assert kinds >= {"Namespace", "NetworkPolicy", "Secret", "StatefulSet", "Deployment"}
            instance = standin.objects[
                f"/apis/apps/v1/namespaces/customer-{broken}/deployments/instance"
            ]
            assert instance["spec"]["strategy"] == {"type": "Recreate"}
            assert instance["metadata"]["generation"] == 2
            await eventually(relay.relay_once, lambda n: n == 0, what="outbox relayed")

        # The log holds who asked for each update: the rollout, once per customer and run.
        requested = []
        async for message in store.read(event_types=["DeploymentRequested"]):
            event = decode_event(decode_envelope(message.data))
            if event.requested_by.startswith("rollout:"):
                requested.append(event.customer_id)
        assert sorted(requested) == sorted([*starters, broken, enterprise])


async def test_an_instance_that_fails_after_its_update_stops_the_rollout_at_the_gate(
    pool: asyncpg.Pool, provisioner_database: str, store: EventStore
) -> None:
    standin = KubeStandIn()
    async with served(standin) as url:
        first_one, second = sorted(str(uuid.uuid4()) for _ in range(2))
        async with provisioner_worker(
            pool, provisioner_settings(provisioner_database, OLD_IMAGE), url, store
        ):
            await license_and_deploy(pool, license_issued(first_one), license_issued(second))

        new = provisioner_settings(provisioner_database, NEW_IMAGE)
        async with provisioner_worker(pool, new, url, store):
            backend = kubernetes_backend(new, api_client_for(url))
            async with backend_running(backend):
                plan = await plan_rollout(pool, backend, new, batch_size=1, canary=1)
                rollout = Rollout(
                    pool, backend, new, batch_timeout=30, settle_seconds=1.0, poll_seconds=0.05
                )
                running = asyncio.create_task(rollout.run(plan))
                # Its job succeeded and the gate found it healthy; then its pods stop being
                # ready, as a new version that crashes a little after it starts would.
                instance = f"customer-{first_one}/deployments/instance"
                await eventually(
                    lambda: asyncio.sleep(
                        0,
                        any(
                            r["user_agent"] == USER_AGENT and r["path"].endswith(instance)
                            for r in standin.requests
                        ),
                    ),
                    what="the gate's first check",
                )
                standin.unready = {f"customer-{first_one}/instance"}
                report = await running
                assert report.stopped and report.updated == [] and report.untouched == [second]
                [failure] = report.failures
                assert failure.customer_id == first_one
                assert failure.reason == (
                    "healthy after its update, then not: "
                    "Deployment instance not available: MinimumReplicasUnavailable"
                )
                # Its job had stamped it done; the gate took that back, so a rerun applies it.
                assert await backend.applied_manifest(first_one) is None
                assert image_of(standin, second) == OLD_IMAGE

                standin.unready = set()
                again = await plan_rollout(pool, backend, new, batch_size=1, canary=1)
                assert [t.customer_id for t in again.tenants] == [first_one, second]
                report = await Rollout(
                    pool, backend, new, batch_timeout=30, settle_seconds=0.2, poll_seconds=0.05
                ).run(again)
                assert not report.stopped and report.updated == [first_one, second]
                for customer_id in (first_one, second):
                    assert image_of(standin, customer_id) == NEW_IMAGE
                    assert await backend.applied_manifest(customer_id) == (
                        plan.tenants[0].wanted
                        if customer_id == first_one
                        else plan.tenants[1].wanted
                    )
                # Everyone is on today's manifests: nothing to do, unless forced.
                done = await plan_rollout(pool, backend, new)
                assert done.tenants == [] and len(done.skipped) == 2
                forced = await plan_rollout(pool, backend, new, force=True)
                assert [t.customer_id for t in forced.tenants] == [first_one, second]


async def test_a_rollout_run_with_other_settings_than_the_workers_stops_at_the_canary(
    pool: asyncpg.Pool, provisioner_database: str, store: EventStore
) -> None:
    standin = KubeStandIn()
    async with served(standin) as url:
        customers = sorted(str(uuid.uuid4()) for _ in range(2))
        old = provisioner_settings(provisioner_database, OLD_IMAGE)
        # The workers still run the old image (not restarted after the upgrade) while the
        # operator's rollout renders the new one.
        async with provisioner_worker(pool, old, url, store):
            await license_and_deploy(pool, *(license_issued(c) for c in customers))
            new = provisioner_settings(provisioner_database, NEW_IMAGE)
            backend = kubernetes_backend(new, api_client_for(url))
            async with backend_running(backend):
                plan = await plan_rollout(pool, backend, new, batch_size=5, canary=1)
                report = await Rollout(
                    pool, backend, new, batch_timeout=30, settle_seconds=0, poll_seconds=0.05
                ).run(plan)
                [failure] = report.failures
                assert report.stopped and report.untouched == [customers[1]]
                assert failure.customer_id == customers[0]
                assert "not the" in failure.reason and "this rollout renders" in failure.reason
                # One failure tolerated: the next batch runs, and the second failure stops it.
                tolerant = await Rollout(
                    pool,
                    backend,
                    new,
                    batch_timeout=30,
                    settle_seconds=0,
                    poll_seconds=0.05,
                    max_failures=1,
                ).run(plan)
                assert tolerant.stopped and tolerant.batches_run == 2
                assert [f.customer_id for f in tolerant.failures] == customers
                # One rollout at a time: another one (another shell, another pod) is refused.
                async with pool.acquire() as held:
                    await held.execute(
                        "SELECT pg_advisory_lock(hashtextextended('provisioner:rollout', 0))"
                    )
                    with pytest.raises(RolloutBusy):
                        await Rollout(pool, backend, new).run(plan)
                    await held.execute(
                        "SELECT pg_advisory_unlock(hashtextextended('provisioner:rollout', 0))"
                    )
                # --only names customers; one that is not deployed here is said so.
                only = await plan_rollout(
                    pool, backend, new, only=[customers[1], "not-a-customer"], canary=0
                )
                assert [t.customer_id for t in only.tenants] == [customers[1]]
                assert only.not_deployed == ["not-a-customer"]
        assert {image_of(standin, c) for c in customers} == {OLD_IMAGE}


async def test_a_volume_claim_change_stops_at_the_canary_as_the_api_server_refuses_it(
    pool: asyncpg.Pool, provisioner_database: str, store: EventStore
) -> None:
    # Kubernetes never changes a StatefulSet's volume claim templates in place: a new storage
    # class or size for existing customers is a migration of its own, not a rollout.
    standin = KubeStandIn()
    async with served(standin) as url:
        customers = sorted(str(uuid.uuid4()) for _ in range(2))
        old = provisioner_settings(provisioner_database, OLD_IMAGE)
        async with provisioner_worker(pool, old, url, store):
            await license_and_deploy(pool, *(license_issued(c) for c in customers))
        moved = msgspec.structs.replace(old, storage_class="fast")
        async with provisioner_worker(pool, moved, url, store):
            backend = kubernetes_backend(moved, api_client_for(url))
            async with backend_running(backend):
                plan = await plan_rollout(pool, backend, moved, batch_size=5, canary=1)
                report = await Rollout(
                    pool, backend, moved, batch_timeout=30, settle_seconds=0, poll_seconds=0.05
                ).run(plan)
    [failure] = report.failures
    assert (failure.customer_id, report.untouched) == (customers[0], [customers[1]])
    assert failure.reason.startswith(
        "job failed: Kubernetes refused applying StatefulSet postgres: 422"
    ), failure.reason
