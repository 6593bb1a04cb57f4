"""Storage by plan, deletion with a grace period, and the restore drill, on the kubernetes
backend: sizes from real signed licenses, and the backend's calls against the STAND-IN of the
API server (tests/k8s_standin.py; no API server can run here, and no Job runs in it: the
stand-in reports a drill Job Complete with a canned message).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from k8s_standin import KubeStandIn, api_client_for, backend_running, kube_api, no_progress, served

from services.provisioner.backends.base import BackendError, InstanceSpec
from services.provisioner.backends.kubernetes import grace as k8s_grace
from services.provisioner.backends.kubernetes.backend import KubernetesBackend
from services.provisioner.backends.kubernetes.manifests.render import render
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings
from services.provisioner.backends.kubernetes.storage import (
    StoragePolicy,
    gib_of,
    keep_grown,
    plan_usage,
    tenant_storage,
)
from services.provisioner.backups import run_restore, run_restore_drill
from support import signed_license_issued

CUSTOMER = "5e0c2b7a-91d4-4f3e-8a6b-2c7d9e1f0a33"
NS = f"customer-{CUSTOMER}"
SECRET = b"k" * 40
K8S_VERSION = "1.37.0"
GIB = 1024**3


def spec_for(plan: str) -> InstanceSpec:
    issued = signed_license_issued(CUSTOMER, plan=plan)
    return InstanceSpec(
        customer_id=CUSTOMER,
        plan=plan,
        license_jwt=issued.jwt,
        license_id=issued.license_id,
        jwks_url="http://licensing/.well-known/jwks.json",
    )


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def claim_size(objects: list[dict[str, Any]], name: str) -> str:
    return str(
        find(objects, "PersistentVolumeClaim", name)["spec"]["resources"]["requests"]["storage"]
    )


def quota_storage(objects: list[dict[str, Any]]) -> str:
    return str(find(objects, "ResourceQuota", "customer-quota")["spec"]["hard"]["requests.storage"])


# --- sizing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plan", "data", "backups", "kept"),
    [
        # 100k/day x 90 d x 240 B x 1.3 = 2.6 GiB -> 3; backups 3 x 0.2 x (3 + 1) = 2.4 -> 3
        ("trial", 3, 3, 3),
        ("starter", 3, 5, 7),
        # 1M/day x 365 d x 240 B x 1.3 = 106.06 GiB -> 107; 107 x 0.2 x 15 = 321 -> 322 (the
        # float product lands a hair above 321)
        ("professional", 107, 322, 14),
        # 10M/day x 1825 d x 240 B x 1.3 = 5302.95 GiB -> 5303 (5.2 TiB); 5303 x 0.2 x 15
        ("enterprise", 5303, 15910, 14),
    ],
)
def test_each_plan_gets_the_volumes_its_license_needs(
    plan: str, data: int, backups: int, kept: int
) -> None:
    spec = spec_for(plan)
    usage = plan_usage(spec.license_jwt)
    assert usage is not None and usage.messages_per_day > 0 and usage.retention_days > 0
    storage = tenant_storage(plan, spec.license_jwt, StoragePolicy())
    assert (storage.data_gib, storage.backups_gib, storage.backups_kept) == (data, backups, kept)
    objects = render(spec, KubernetesSettings(storage_class="fast"), "p" * 40)
    for obj in objects:
        if obj["kind"] not in ("HTTPRoute", "BackendTrafficPolicy"):  # CRDs, not in the schemas
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert claim_size(objects, "data-postgres-0") == f"{data}Gi"
    assert claim_size(objects, "backups") == f"{backups}Gi"
    assert find(objects, "PersistentVolumeClaim", "backups")["spec"]["storageClassName"] == "fast"
    assert quota_storage(objects) == f"{data + backups + 1}Gi"
    kinds = [(o["kind"], o["metadata"]["name"]) for o in objects]
    # The claim exists before the StatefulSet that adopts it.
    assert kinds.index(("PersistentVolumeClaim", "data-postgres-0")) < kinds.index(
        ("StatefulSet", "postgres")
    )


def test_the_bytes_per_reading_and_headroom_are_settings() -> None:
    spec = spec_for("professional")
    doubled = tenant_storage("professional", spec.license_jwt, StoragePolicy(bytes_per_reading=364))
    assert doubled.data_gib == 161  # 1M x 365 x 364 x 1.3 / 2^30 = 160.8
    no_headroom = tenant_storage(
        "professional", spec.license_jwt, StoragePolicy(bytes_per_reading=182, headroom=1.0)
    )
    assert no_headroom.data_gib == 62  # the issue's ~62 GiB, at the 182 B it was measured with


def test_an_unreadable_license_gets_the_fallback_size() -> None:
    for token in ("header.claims.signature", "not-a-jwt", "a.e30.b"):
        assert plan_usage(token) is None
        assert tenant_storage("starter", token, StoragePolicy()).data_gib == 10


def test_quantities_in_gib() -> None:
    assert gib_of("10Gi") == 10
    assert gib_of("1Ti") == 1024
    assert gib_of("500M") == 1
    assert gib_of("2.5Gi") == 3
    assert gib_of(str(3 * GIB)) == 3
    with pytest.raises(ValueError, match="not a storage quantity"):
        gib_of("ten")


def test_volumes_never_shrink_and_the_quota_follows() -> None:
    objects = render(spec_for("trial"), KubernetesSettings(), "p" * 40)
    grown = keep_grown(objects, {"data-postgres-0": 81, "backups": 1})
    assert claim_size(grown, "data-postgres-0") == "81Gi"
    assert claim_size(grown, "backups") == "3Gi"  # bigger than what exists: applied
    assert quota_storage(grown) == f"{81 + 3 + 1}Gi"
    assert claim_size(objects, "data-postgres-0") == "3Gi"  # the given objects are untouched


# --- against the stand-in ---------------------------------------------------------------------


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[KubeStandIn, str]]:
    standin = KubeStandIn()
    async with served(standin) as url:
        yield standin, url


def backend_for(url: str, token: str, **settings: Any) -> KubernetesBackend:
    return KubernetesBackend(
        KubernetesSettings(**settings),
        SECRET,
        api_client_for(url, token),
        ready_timeout=20,
        poll_seconds=0.05,
    )


async def deploy_starter(url: str, token: str) -> None:
    """The customer deployed on the starter plan; the backend that did it stopped again."""
    async with backend_running(backend_for(url, token)) as backend:
        await backend.deploy(spec_for("starter"), no_progress)


def stored(standin: KubeStandIn, suffix: str) -> dict[str, Any]:
    [obj] = [o for k, o in standin.objects.items() if k.endswith(suffix)]
    return obj


async def test_an_upgrade_grows_the_volume_and_a_downgrade_keeps_it(cluster) -> None:
    standin, url = cluster
    backend = backend_for(url, standin.token)
    async with backend_running(backend):
        await backend.deploy(spec_for("starter"), no_progress)
        data = f"{NS}/persistentvolumeclaims/data-postgres-0"
        assert stored(standin, data)["spec"]["resources"]["requests"]["storage"] == "3Gi"
        await backend.update(spec_for("professional"), no_progress)
        assert stored(standin, data)["spec"]["resources"]["requests"]["storage"] == "107Gi"
        await backend.update(spec_for("starter"), no_progress)
        assert stored(standin, data)["spec"]["resources"]["requests"]["storage"] == "107Gi"
        quota = stored(standin, f"{NS}/resourcequotas/customer-quota")
        assert quota["spec"]["hard"]["requests.storage"] == f"{107 + 322 + 1}Gi"


async def test_a_volume_that_cannot_grow_does_not_hold_back_the_license(
    cluster, caplog: pytest.LogCaptureFixture
) -> None:
    standin, url = cluster
    backend = backend_for(url, standin.token)
    async with backend_running(backend):
        await backend.deploy(spec_for("starter"), no_progress)
        standin.refuse_growth = True
        upgraded = spec_for("professional")
        await backend.update(upgraded, no_progress)
        data = stored(standin, f"{NS}/persistentvolumeclaims/data-postgres-0")
        assert data["spec"]["resources"]["requests"]["storage"] == "3Gi"
        license_secret = stored(standin, f"{NS}/secrets/license")
        assert license_secret["stringData"]["license-id"] == upgraded.license_id
        assert "stays at 3Gi, not grown to 107Gi" in caplog.text
        # A claim that cannot be made at all is still an error.
        standin.fail_status = 403
        with pytest.raises(BackendError):
            await backend.update(upgraded, no_progress)


async def test_a_deletion_stops_keeps_and_a_redeploy_takes_the_customer_back(cluster) -> None:
    standin, url = cluster
    backend = backend_for(url, standin.token, deletion_grace_days=30)
    async with backend_running(backend):
        await backend.deploy(spec_for("starter"), no_progress)
        before = datetime.now(UTC).replace(microsecond=0)
        await backend.delete(CUSTOMER, no_progress)
        namespace = stored(standin, f"namespaces/{NS}")
        labels, notes = namespace["metadata"]["labels"], namespace["metadata"]["annotations"]
        assert labels["iotistic.io/deleted"] == "true"
        deleted_at = datetime.fromisoformat(notes["iotistic.io/deleted-at"])
        purge_after = datetime.fromisoformat(notes["iotistic.io/purge-after"])
        assert deleted_at >= before and purge_after - deleted_at == timedelta(days=30)
        assert int(labels["iotistic.io/purge-after"]) == int(purge_after.timestamp())
        # The labels the renderer gave it are still there: only the marks were added.
        assert labels["app.kubernetes.io/part-of"] == "iotistic"
        for suffix in ("statefulsets/postgres", "statefulsets/mosquitto", "deployments/instance"):
            workload = stored(standin, f"{NS}/{suffix}")
            assert workload["spec"]["replicas"] == 0
            assert workload["spec"]["template"]["spec"]["containers"], "the rest is kept"
        assert stored(standin, f"{NS}/cronjobs/tenant-backup")["spec"]["suspend"] is True
        assert not [k for k in standin.objects if k.endswith(f"{NS}/httproutes/instance")]
        for kept in ("persistentvolumeclaims/data-postgres-0", "persistentvolumeclaims/backups"):
            stored(standin, f"{NS}/{kept}")
        assert (await backend.status(CUSTOMER))["release"] == "deleted"

        # A retried deletion keeps the first dates.
        await asyncio.sleep(1.1)
        await backend.delete(CUSTOMER, no_progress)
        again = stored(standin, f"namespaces/{NS}")["metadata"]["annotations"]
        assert again == notes

        # Redeployed within the grace period: the same namespace and volumes, running again.
        await backend.deploy(spec_for("starter"), no_progress)
        namespace = stored(standin, f"namespaces/{NS}")
        assert "iotistic.io/deleted" not in namespace["metadata"]["labels"]
        assert "annotations" not in namespace["metadata"] or not namespace["metadata"][
            "annotations"
        ].get("iotistic.io/purge-after")
        assert stored(standin, f"{NS}/deployments/instance")["spec"]["replicas"] == 1
        assert stored(standin, f"{NS}/statefulsets/postgres")["spec"]["replicas"] == 1
        assert "suspend" not in stored(standin, f"{NS}/cronjobs/tenant-backup")["spec"]
        stored(standin, f"{NS}/httproutes/instance")
        assert (await backend.status(CUSTOMER))["release"] == "deployed"


async def test_the_purge_deletes_only_namespaces_past_their_date(cluster) -> None:
    standin, url = cluster
    backend = backend_for(url, standin.token, deletion_grace_days=0)
    keeper = backend_for(url, standin.token, deletion_grace_days=30)
    other = "7a1d3c5e-0000-4000-8000-00000000beef"
    async with backend_running(backend), backend_running(keeper):
        await backend.deploy(spec_for("trial"), no_progress)
        await keeper.deploy(
            InstanceSpec(
                customer_id=other,
                plan="trial",
                license_jwt="a.b.c",
                license_id="l",
                jwks_url="http://licensing/.well-known/jwks.json",
            ),
            no_progress,
        )
        await backend.delete(CUSTOMER, no_progress)  # grace 0: due at once
        await keeper.delete(other, no_progress)  # 30 days
        assert await backend.purge_expired() == [NS]
        # Terminating, then gone: a second pass purges nothing more.
        assert await backend.purge_expired() == []
        assert (await backend.status(CUSTOMER))["release"] in ("terminating", "missing")
        assert (await keeper.status(other))["release"] == "deleted"
        # Thirty days on, the other one is due.
        later = datetime.now(UTC) + timedelta(days=30, seconds=5)
        async with kube_api(url, standin.token) as api:
            purged = await k8s_grace.purge_expired(api, later)
        assert purged == [f"customer-{other}"]


# --- the restore drill ----------------------------------------------------------------------


async def test_the_restore_drill_applies_its_job_waits_and_reports(cluster) -> None:
    standin, url = cluster
    await deploy_starter(url, standin.token)
    standin.job_message = "drill ok dump-20261207T031500Z-00.dump sha256 ab12 tables 7 rows 1503"
    async with kube_api(url, standin.token) as api:
        result = await run_restore_drill(
            api,
            CUSTOMER,
            KubernetesSettings(),
            timeout=20,
            poll=0.05,
            now=datetime(2026, 12, 7, 3, 30, tzinfo=UTC),
        )
        assert result.succeeded and result.job == "restore-drill-20261207-033000"
        assert result.summary == standin.job_message
        job = stored(standin, f"{NS}/jobs/restore-drill-20261207-033000")
        kubernetes_validate.validate(
            {k: v for k, v in job.items() if k != "status"}
            | {
                "metadata": {
                    k: v for k, v in job["metadata"].items() if k not in ("generation", "uid")
                }
            },
            K8S_VERSION,
            strict=True,
        )
        standin.failing_jobs = {"restore-drill-20261207-033100"}
        standin.job_message = "drill failed: no intact dump in /backups"
        failed = await run_restore_drill(
            api,
            CUSTOMER,
            KubernetesSettings(),
            timeout=20,
            poll=0.05,
            now=datetime(2026, 12, 7, 3, 31, tzinfo=UTC),
        )
        assert not failed.succeeded and failed.summary == standin.job_message
        with pytest.raises(BackendError, match="no namespace customer-nobody"):
            await run_restore_drill(api, "nobody", KubernetesSettings(), timeout=1, poll=0.05)


async def test_the_restore_drill_command_prints_the_result(cluster, tmp_path: Path) -> None:
    """``iotistic provisioner restore-drill`` with a kubeconfig naming the stand-in."""
    standin, url = cluster
    await deploy_starter(url, standin.token)
    standin.job_message = "drill ok dump-x.dump sha256 cd34 tables 7 rows 9"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "standin", "cluster": {"server": url.rstrip("/")}}],
                "users": [{"name": "op", "user": {"token": standin.token}}],
                "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "op"}}],
                "current-context": "standin",
            }
        )
    )
    # A process of its own, as an operator runs it: the kubeconfig is read at its start.
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    env.update(KUBECONFIG=str(kubeconfig), PYTHONPATH=str(Path(__file__).parents[2]))
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from services.cli.main import main; main()",
        "--data-dir",
        str(tmp_path),
        "provisioner",
        "restore-drill",
        CUSTOMER,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    out = output.decode()
    assert process.returncode == 0, out
    assert f"restore drill {NS}/restore-drill-" in out and "passed" in out
    assert standin.job_message in out

    # The purge, as an operator (or a CronJob) runs it: nothing is due yet.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from services.cli.main import main; main()",
        "provisioner",
        "purge",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, output.decode()
    assert "0 namespace(s) purged" in output.decode()


async def test_a_restore_stops_the_instance_for_its_job_and_lets_it_go_after(cluster) -> None:
    standin, url = cluster
    await deploy_starter(url, standin.token)
    standin.job_message = "restored dump-20261207T031500Z-00.dump into iotistic"
    async with kube_api(url, standin.token) as api:
        result = await run_restore(
            api,
            CUSTOMER,
            KubernetesSettings(),
            timeout=20,
            poll=0.05,
            dump="dump-20261207T031500Z-00.dump",
            now=datetime(2026, 12, 7, 4, 0, tzinfo=UTC),
        )
    assert result.succeeded and result.summary == standin.job_message
    patches = [
        (r["query"]["fieldManager"], r["body"]["kind"], r["body"].get("spec", {}).get("replicas"))
        for r in standin.requests
        if r["method"] == "PATCH" and r["body"]["kind"] in ("Deployment", "Job")
    ][-3:]
    assert patches == [
        ("iotistic-provisioner-restore", "Deployment", 0),
        ("iotistic-provisioner", "Job", None),
        ("iotistic-provisioner-restore", "Deployment", None),
    ]
    job = stored(standin, f"{NS}/jobs/restore-20261207-040000")
    [container] = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["BACKUP_FILE"] == "dump-20261207T031500Z-00.dump" and env["RESTORE_CLEAN"] == "1"
    assert container["command"][-1].endswith("/restore.sh")
    # Let go of: the instance runs again with the replicas the provisioner gives it.
    assert stored(standin, f"{NS}/deployments/instance")["spec"]["replicas"] == 1
