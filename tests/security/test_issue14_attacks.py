"""Attacks on what issue 14 built (the chart, the tenant manifests, rotation, rollout), as a
malicious tenant and as an operator on a bad day. Each test shows one finding; what held is
listed in the report of the session that wrote them.

No API server runs here: the kubernetes backend talks to the labelled STAND-IN
(tests/k8s_standin.py); the broker's hook runs against a real Mosquitto.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import helm_python
import pytest
import yaml
from k8s_standin import (
    KubeStandIn,
    api_client_for,
    backend_running,
    no_progress,
    served,
    starter_spec,
)
from litestar import Request, Response

from libs.config import load_settings
from libs.db.postgres import migrate, service_migrations
from libs.servers.mosquitto import ADMIN_USER, EmbeddedMosquitto
from services.cli import main as cli
from services.provisioner.backends.base import BackendError, InstanceSpec, derive_password
from services.provisioner.backends.kubernetes.backend import KubernetesBackend
from services.provisioner.backends.kubernetes.credentials import customer_objects
from services.provisioner.backends.kubernetes.manifests.metadata import (
    CREDENTIALS_GENERATION,
    namespace_of,
)
from services.provisioner.backends.kubernetes.manifests.mosquitto import MQTT_POST_START_SH
from services.provisioner.backends.kubernetes.manifests.network import public_internet
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings
from services.provisioner.rotation import rotate_credentials
from services.provisioner.settings import ProvisionerSettings

CUSTOMER = "0b4e7a0e-5bfe-4b8e-9d2b-2c2b8f6c1a11"
NS = f"customer-{CUSTOMER}"
SECRET = b"a" * 40


def spec() -> InstanceSpec:
    return starter_spec(CUSTOMER)


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[KubeStandIn, str]]:
    standin = KubeStandIn()
    async with served(standin) as url:
        yield standin, url


def backend_for(url: str) -> KubernetesBackend:
    return KubernetesBackend(
        KubernetesSettings(), SECRET, api_client_for(url), ready_timeout=5, poll_seconds=0.05
    )


def _fail_applies_after_the_namespace(standin: KubeStandIn) -> None:
    """From the next apply on, the API server answers 500 to every apply after the first
    (the Namespace's): the rotation is cut off there, as a killed command or a flaky API would."""
    real = standin._apply
    seen = {"applies": 0}

    def apply(path: str, request: Request[Any, Any, Any], obj: dict[str, Any]) -> Response[Any]:
        seen["applies"] += 1
        if seen["applies"] > 1:
            return Response({"kind": "Status", "code": 500}, status_code=500)
        return real(path, request, obj)

    standin._apply = apply  # type: ignore[method-assign]


def _broker_hook(tmp_path: Path, broker: EmbeddedMosquitto, mqtt: dict[str, str]) -> str:
    """Run the broker's postStart hook with the mqtt Secret's files; its log."""
    admin = tmp_path / "admin"
    admin.mkdir(exist_ok=True)
    # The embedded broker's admin has its own name; the passwords are the Secret's.
    (admin / "admin-username").write_text(ADMIN_USER)
    for key in ("admin-password", "admin-password-previous"):
        (admin / key).write_text(mqtt[key])
    script = tmp_path / "post-start.sh"
    script.write_text(MQTT_POST_START_SH)
    log = tmp_path / "hook.log"
    log.write_text("")
    env = {
        "PATH": "/usr/bin:/bin",
        "IOTISTIC_MQTT_ADMIN": str(admin),
        "IOTISTIC_MQTT_PORT": str(broker.port),
        "IOTISTIC_LOG_TO": str(log),
    }
    subprocess.run(["sh", str(script)], env=env, timeout=180, capture_output=True, check=False)
    return log.read_text()


def _admin_works(broker: EmbeddedMosquitto, password: str) -> bool:
    command = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-u", ADMIN_USER]
    command += ["-P", password, "-t", "$SYS/broker/version", "-C", "1", "-W", "5"]
    return subprocess.run(command, capture_output=True, timeout=30).returncode == 0


# --- 1. a rotation cut off after the Namespace, then run again, locks the broker's admin out --


async def test_an_interrupted_rotation_run_again_keeps_the_broker_admin_reachable(
    cluster: tuple[KubeStandIn, str], tmp_path: Path
) -> None:
    standin, url = cluster
    backend = backend_for(url)
    async with backend_running(backend):
        await backend.deploy(spec(), no_progress)
        _fail_applies_after_the_namespace(standin)
        # The operator's first rotation: the Namespace records generation 1, then the API
        # answers 500 (or the command is killed); the mqtt Secret and the broker stay at 0.
        with pytest.raises(BackendError):
            await backend.rotate_credentials(spec(), no_progress)
        standin._apply = KubeStandIn._apply.__get__(standin)
        # The operator runs it again, as the error invites.
        assert await backend.rotate_credentials(spec(), no_progress) == 2
    mqtt = standin.objects[f"/api/v1/namespaces/{NS}/secrets/mqtt"]["stringData"]
    # The broker's dynamic-security file still has generation 0's admin password: the only
    # rollout of the mosquitto StatefulSet (by the second rotation) restarts it with a Secret
    # that must offer a way from there to generation 2.
    running = derive_password(SECRET, "mqtt-admin", CUSTOMER, 0)
    broker = EmbeddedMosquitto(tmp_path / "broker")
    (broker.data_dir / "admin-password").write_text(running)
    broker.start()
    try:
        log = _broker_hook(tmp_path, broker, mqtt)
        assert _admin_works(broker, mqtt["admin-password"]), log
    finally:
        broker.stop()


# --- 2. the instance's egress lets IPv4 private and metadata addresses out inside IPv6 --------


def _admitted(blocks: list[dict[str, Any]], address: str) -> bool:
    """Whether an ipBlock peer of ``blocks`` admits ``address`` (in a cidr, in no except)."""
    ip = ipaddress.ip_address(address)
    for peer in blocks:
        block = peer["ipBlock"]
        network = ipaddress.ip_network(block["cidr"])
        if ip.version != network.version or ip not in network:
            continue
        if not any(ip in ipaddress.ip_network(e) for e in block.get("except", [])):
            return True
    return False


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::a9fe:a9fe",  # NAT64 (RFC 6052) of 169.254.169.254, the cloud metadata
        "64:ff9b::a00:5",  # NAT64 of 10.0.0.5, a node or a pod of the cluster
        "64:ff9b:1::a9fe:a9fe",  # the local-use NAT64 prefix (RFC 8215)
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "2002:a00:5::1",  # 6to4 of 10.0.0.5
    ],
)
def test_the_instance_egress_refuses_ipv4_private_addresses_carried_in_ipv6(address: str) -> None:
    """The instance's webhook check (services/instance/alerts/targets.py) refuses these, as the IPv4
    address they carry; the NetworkPolicy, the layer that holds when that check does not,
    must refuse them too: on a cluster with NAT64 (IPv6-only pods, DNS64) they reach it."""
    blocks = public_internet()
    assert _admitted(blocks, "2606:4700::1111")  # a public IPv6 address stays reachable
    assert _admitted(blocks, "1.1.1.1")
    assert _admitted(blocks, "64:ff9b::101:101")  # 1.1.1.1 through NAT64 too
    assert not _admitted(blocks, address)


# --- 3. a rotation while the customer's job runs is undone by that job --------------------------


async def test_a_rotation_waits_for_no_job_and_refuses_while_one_of_the_customers_runs(
    cluster: tuple[KubeStandIn, str], database_url: str
) -> None:
    """A job that read generation N (a rollout's update, a license change) and applies after
    the rotation recorded N+1 puts N's passwords back on the Namespace and in the Secrets,
    while the broker, restarted by the rotation, has moved its admin to N+1: no password the
    Secret holds works there any more, and the instance cannot set its ingest client's. The
    command must not rotate under a running job of the customer's."""
    standin, url = cluster
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, "provisioner", service_migrations("services.provisioner.migrations"))
        await conn.execute(
            "INSERT INTO provisioner.customer_licenses "
            "(customer_id, license_id, plan, jwt, max_devices) VALUES ($1, 'lic-1', 'starter', "
            "'header.claims.signature', 10) ON CONFLICT DO NOTHING",
            CUSTOMER,
        )
        await conn.execute(
            "INSERT INTO provisioner.queue_jobs (job_id, customer_id, kind, priority, state, "
            "data, max_attempts, created_at, run_after, lease_owner, lease_until) VALUES "
            "('job-running', $1, 'update', 1, 'active', '{}', 3, now(), now(), 'worker-1', "
            "now() + interval '5 minutes')",
            CUSTOMER,
        )
    finally:
        await conn.close()
    settings = load_settings(
        ProvisionerSettings,
        {
            "DATABASE_URL": database_url,
            "PROVISIONER_BACKEND": "kubernetes",
            "PROVISIONER_SECRET": SECRET.decode(),
        },
    )
    backend = backend_for(url)
    async with backend_running(backend):
        await backend.deploy(spec(), no_progress)
    applied = len(standin.applied())
    with pytest.raises(BackendError, match="job-running"):
        await rotate_credentials(settings, CUSTOMER, no_progress, backend=backend)
    assert len(standin.applied()) == applied  # nothing applied
    namespace = standin.objects[f"/api/v1/namespaces/{NS}"]
    assert namespace["metadata"]["annotations"][CREDENTIALS_GENERATION] == "0"
    # Once the job has finished, the rotation goes ahead.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE provisioner.queue_jobs SET state = 'completed', finished_on = now() "
            "WHERE job_id = 'job-running'"
        )
    finally:
        await conn.close()
    assert await rotate_credentials(settings, CUSTOMER, no_progress, backend=backend) == 1


# --- 4. GitOps (`helm template`, Argo CD): the bundled Postgres's password changes every render --

CHART = Path(__file__).resolve().parents[2] / "charts" / "iotistic"


def _render_chart(values: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart as `helm template` renders it: no cluster, so every lookup finds nothing."""
    files = helm_python.Chart.load(str(CHART)).render(
        values, name="rel", namespace="iot", is_install=True
    )
    return [
        doc
        for path, text in files.items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def test_the_documented_gitops_settings_render_no_generated_password() -> None:
    """values.yaml: under `helm template` (Argo CD) "create the Secrets yourself
    (secrets.existingSecret, bus.existingSecret)". The bundled Postgres (on by default) still
    made its own password on every render: each sync gave its Secret, and so every target's
    DATABASE_URL, a new one the database (initialised once, with the first) does not know,
    and the control plane lost its database at the next restart of its pods. Its password
    must be one of yours too (postgresql.existingSecret)."""
    values = {
        "baseDomain": "example.com",
        "secrets": {"existingSecret": "mine"},
        "bus": {"existingSecret": "mine-bus"},
        "natsConfig": {"enabled": False},
        "nats": {"enabled": False},
        "postgresql": {"existingSecret": "mine-postgresql"},
    }
    first, second = _render_chart(values), _render_chart(values)
    assert first == second  # nothing generated: every render the same
    assert not [d for d in first if d["kind"] == "Secret"]
    [postgres] = [d for d in first if d["kind"] == "StatefulSet" and "postgresql" in str(d)]
    volumes = postgres["spec"]["template"]["spec"]["volumes"]
    assert {"secretName": "mine-postgresql"} in [
        {"secretName": v["secret"]["secretName"]} for v in volumes if "secret" in v
    ]
    for deployment in (d for d in first if d["kind"] == "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            for env in container.get("env", []):
                if env["name"] == "DATABASE_URL":
                    ref = env["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == "mine-postgresql", deployment["metadata"]["name"]


async def test_a_rotation_leaves_a_namespace_being_deleted_alone(
    cluster: tuple[KubeStandIn, str],
) -> None:
    """The customer closed and their namespace is terminating: a rotation that re-applied
    everything would patch the dying Namespace and try to put a fresh instance (license
    included) in it, or, the namespace gone just after it looked, make it anew for nobody."""
    standin, url = cluster
    backend = backend_for(url)
    async with backend_running(backend):
        await backend.deploy(spec(), no_progress)
        standin.objects[f"/api/v1/namespaces/{NS}"]["metadata"]["deletionTimestamp"] = (
            "2026-01-01T00:00:00Z"
        )
        applied = len(standin.applied())
        with pytest.raises(BackendError, match="being deleted"):
            await backend.rotate_credentials(spec(), no_progress)
        assert len(standin.applied()) == applied


# --- 5. a secret given in config lands in a ConfigMap -----------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("SESSION_SECRET", "s" * 48),
        ("PROVISIONER_SECRET", "p" * 48),
        ("USAGE_SECRET", "u" * 48),
        ("LOGIN_RELAY_SECRET", "r" * 48),
        ("STRIPE_SECRET_KEY", "sk_live_" + "x" * 24),
        ("STRIPE_WEBHOOK_SECRET", "whsec_" + "x" * 24),
        ("LICENSE_PRIVATE_KEY", "-----BEGIN PRIVATE KEY-----"),
        ("ADMIN_TOKEN", "a" * 48),
        ("DATABASE_URL", "postgresql://u:secretpw@db:5432/x"),
        ("NATS_URL", "nats://operator:secretpw@nats:4222"),
    ],
)
def test_a_secret_given_in_config_is_refused_not_put_in_a_configmap(key: str, value: str) -> None:
    """An operator who writes `--set config.SESSION_SECRET=...` (config is where every other
    setting goes) had it rendered into the ConfigMap, readable by whoever may read ConfigMaps,
    and silently unused (the Secret reference wins); ADMIN_TOKEN and DATABASE_URL were
    silently dropped. The render must fail and say where the value belongs."""
    values = {"baseDomain": "example.com", "config": {key: value}}
    with pytest.raises(helm_python.HelmError) as caught:
        _render_chart(values)
    assert key in str(caught.value)
    assert value not in str(caught.value)


# --- 6. two customers, one namespace ------------------------------------------------------------


@pytest.mark.parametrize(("one", "other"), [("Acme", "acme"), ("a_b", "a-b"), ("a.b", "a-b")])
def test_ids_that_map_to_one_name_are_refused(one: str, other: str) -> None:
    """dns_label lower-cases and maps every other character to '-': ids differing only there
    share a namespace and a host name, and the second deploy would take over the first's
    database, broker and route."""
    settings = KubernetesSettings()
    assert namespace_of(one, settings) == namespace_of(other, settings)
    with pytest.raises(BackendError, match="not a DNS label"):
        customer_objects(
            dataclasses.replace(spec(), customer_id=one), settings, SECRET, credentials_generation=0
        )


async def test_a_namespace_cut_short_is_never_applied_or_deleted_for_another_customer(
    cluster: tuple[KubeStandIn, str],
) -> None:
    """A namespace prefix of 32 characters (the longest the settings take) leaves 31 for the
    id: two ids alike that far share the namespace. The second customer's deploy or update
    must not replace the first's objects, nor their delete remove the first's namespace."""
    standin, url = cluster
    settings = KubernetesSettings(namespace_prefix="p" * 31 + "-")
    first = CUSTOMER
    second = CUSTOMER[:31] + "fffff"
    assert namespace_of(first, settings) == namespace_of(second, settings)

    backend = KubernetesBackend(
        settings, SECRET, api_client_for(url), ready_timeout=5, poll_seconds=0.05
    )
    async with backend_running(backend):
        await backend.deploy(spec(), no_progress)
        theirs = dataclasses.replace(spec(), customer_id=second, license_id="lic-2")
        for attempt in (backend.deploy, backend.update, backend.rotate_credentials):
            with pytest.raises(BackendError, match="belongs to customer"):
                await attempt(theirs, no_progress)
        with pytest.raises(BackendError, match="belongs to customer"):
            await backend.delete(second, no_progress)
    ns = namespace_of(first, settings)
    license_secret = standin.objects[f"/api/v1/namespaces/{ns}/secrets/license"]["stringData"]
    assert license_secret["license-id"] == "lic-1"
    assert f"/api/v1/namespaces/{ns}" in standin.objects


# --- 7. `provisioner render` (for GitOps) applied after a rotation sets the generation back ----


def test_rendered_manifests_applied_after_a_rotation_do_not_set_the_generation_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`iotistic provisioner render` is "for GitOps": its output gets applied. It printed the
    Namespace with iotistic.io/credentials-generation: 0 (the flag's default), so applying it
    after a rotation recorded 0 again: the next job of the customer's applied generation 0's
    passwords, and the broker, whose admin had moved on, was left with none it knew."""
    license_file = tmp_path / "license.jwt"
    license_file.write_text("header.claims.signature")
    monkeypatch.setenv("PROVISIONER_SECRET", SECRET.decode())
    monkeypatch.setenv("HOME", str(tmp_path))
    for include in ([], ["--include-secrets"]):
        with pytest.raises(SystemExit) as done:
            cli.main(
                [
                    "--data-dir",
                    str(tmp_path / "data"),
                    "provisioner",
                    "render",
                    CUSTOMER,
                    "--license-file",
                    str(license_file),
                    *include,
                ]
            )
        assert done.value.code == 0
        [namespace] = [
            o for o in yaml.safe_load_all(capsys.readouterr().out) if o and o["kind"] == "Namespace"
        ]
        annotations = namespace["metadata"].get("annotations") or {}
        assert CREDENTIALS_GENERATION not in annotations, include


# --- 8. an apply with another PROVISIONER_SECRET re-passwords the tenant ----------------------


async def test_an_apply_with_another_provisioner_secret_is_refused(
    cluster: tuple[KubeStandIn, str],
) -> None:
    """Every password derives from PROVISIONER_SECRET. `rotate-credentials` run with a stale
    .env, or a chart render that made the secret anew (helm template: lookup finds nothing),
    applied passwords derived from another secret: Postgres took them (its start sets them
    over the local socket), but the broker's admin moves only from a password it had, so it
    was lost, and with it the instance's ingest client. Such an apply must be refused."""
    standin, url = cluster
    backend = backend_for(url)
    async with backend_running(backend):
        await backend.deploy(spec(), no_progress)
    before = standin.objects[f"/api/v1/namespaces/{NS}/secrets/mqtt"]["stringData"]

    stale = KubernetesBackend(
        KubernetesSettings(), b"z" * 40, api_client_for(url), ready_timeout=5, poll_seconds=0.05
    )
    async with backend_running(stale):
        for attempt in (stale.rotate_credentials, stale.update, stale.deploy):
            with pytest.raises(BackendError, match="another PROVISIONER_SECRET"):
                await attempt(spec(), no_progress)
    assert standin.objects[f"/api/v1/namespaces/{NS}/secrets/mqtt"]["stringData"] == before
