"""A customer's Kubernetes instance, started with exactly the environment its Deployment gives
it, signs its customer in and reports usage to billing.

The control plane runs as the chart runs it: signup, licensing, billing and the provisioner each
a process (here a platform) of its own, on its own port, sharing the database and the log. The
provisioner uses the kubernetes backend, applying to the STAND-IN for a Kubernetes API server
(tests/k8s_standin.py; no API server can run here), so what it renders from its own settings is
what the test reads back: the instance Deployment, and the Secrets its ``secretKeyRef``s and
license volume name. The instance then runs as its container would (the image's entrypoint and
the container's args) with that environment, where only a small, explicit table maps what is a
cluster name (Service DNS names, the Secret volume's path, the pod's listening address) to the
local server standing in for it; every other variable passes through unchanged. The tenant's
own Postgres and Mosquitto are real servers, given their users the way the tenant's StatefulSets
do: Postgres with the POSTGRES_* of its container, Mosquitto by running the rendered dynsec-init
command itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import msgspec
import pytest
from k8s_standin import KubeStandIn, api_client_for, served

from libs.config import ConfigError, ServiceSettings
from libs.eventlog.store import EventStore
from libs.mqtt.dynsec import DynSec
from libs.runtime.platform import Platform
from libs.servers.mosquitto import EmbeddedMosquitto
from libs.servers.ports import free_port
from libs.servers.postgres import EmbeddedPostgres, postgres_bin_dir
from services.instance.settings import InstanceSettings
from services.instance.usage import UsageReporter
from services.provisioner.app import check_reachable_from_pods, kubernetes_settings
from services.provisioner.backends.base import InstanceSpec
from services.provisioner.backends.kubernetes import api as k8s_backend
from services.provisioner.backends.kubernetes.credentials import customer_objects
from services.provisioner.backends.kubernetes.manifests.instance import INSTANCE_PORT
from services.provisioner.backends.kubernetes.manifests.metadata import host_of, namespace_of
from services.provisioner.backends.kubernetes.manifests.mosquitto import DYNSEC_FILE
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings
from services.provisioner.settings import ProvisionerSettings
from services.targets import CONTROL_PLANE, build_app
from support import SUITE_SIGNUP_LIMITS, eventually, license_keys_dir, serving

pytestmark = pytest.mark.slow

PASSWORD = "a long passphrase"
IOTISTIC = str(Path(sys.executable).parent / "iotistic")  # the image's ENTRYPOINT
# The control plane's Services as the chart names them (release "acme" in namespace "iotistic").
CLUSTER_URLS = {
    "signup": "http://acme-iotistic-signup.iotistic.svc:8080",
    "licensing": "http://acme-iotistic-licensing.iotistic.svc:8080",
    "billing": "http://acme-iotistic-billing.iotistic.svc:8080",
}
JWKS_PATH = "/.well-known/jwks.json"
USAGE_SECRET = "u" * 40
LOGIN_RELAY_SECRET = "r" * 40
PROVISIONER_SECRET = "p" * 40
# Besides the common settings: each platform takes those of its own service.
PLATFORM_SETTINGS: dict[str, object] = {
    "license_keys_dir": license_keys_dir(),
    "argon2_memory_kib": 8192,
    "argon2_time_cost": 1,
    "usage_secret": USAGE_SECRET,
    "login_relay_secret": LOGIN_RELAY_SECRET,
    "provisioner_backend": "kubernetes",
    "provisioner_secret": PROVISIONER_SECRET,
    "control_plane_url": CLUSTER_URLS["signup"],
    "usage_url": CLUSTER_URLS["billing"],
    "license_jwks_url": CLUSTER_URLS["licensing"] + JWKS_PATH,
    # Short, so a report arrives within the test: rendered from here, not overridden later.
    "instance_usage_report_seconds": 1.0,
    "kubernetes_ready_timeout_seconds": 30,
    "queue_retry_delay": 300,
    "queue_lease_seconds": 5,
    **SUITE_SIGNUP_LIMITS,
}
# What the image's ENV (deploy/Dockerfile) and this machine give the process besides the
# container's env: Python's own switches, and where this checkout's Python and code are.
IMAGE_ENV = {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
MACHINE_ENV = ("PATH", "HOME", "LANG", "VIRTUAL_ENV", "PYTHONPATH", "TMPDIR")


@dataclass
class ControlPlane:
    """Each target's local URL, and the STAND-IN cluster the provisioner applies to."""

    urls: dict[str, str]
    cluster: KubeStandIn


@pytest.fixture(scope="module")
async def control_plane(
    settings: ServiceSettings, store: EventStore
) -> AsyncIterator[ControlPlane]:
    """Signup, licensing, billing and the provisioner, each on a port of its own; the
    provisioner's kubernetes backend talks to the STAND-IN API server."""
    cluster = KubeStandIn()
    async with contextlib.AsyncExitStack() as stack:
        api_url = await stack.enter_async_context(served(cluster))
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        # STAND-IN for the in-cluster configuration (service-account token, API address).
        patch.setattr(k8s_backend, "cluster_client", api_client_for(api_url, cluster.token))
        urls = {}
        platforms = []
        for name, definition in CONTROL_PLANE.items():
            platform = Platform.from_settings(settings, [definition], **PLATFORM_SETTINGS)
            http = await stack.enter_async_context(serving(build_app(platform, name)))
            urls[name] = str(http.base_url).rstrip("/")
            platforms.append(platform)
        for platform in platforms:
            await platform.wait_started()
        yield ControlPlane(urls, cluster)


def objects_in(cluster: KubeStandIn, namespace: str) -> dict[tuple[str, str], dict[str, Any]]:
    """What the provisioner applied in ``namespace``, by (kind, name)."""
    return {
        (o["kind"], o["metadata"]["name"]): o
        for o in cluster.objects.values()
        if o["metadata"].get("namespace") == namespace
    }


def secrets_of(objects: Mapping[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Each Secret's data by name."""
    return {
        name: o.get("stringData", {}) for (kind, name), o in objects.items() if kind == "Secret"
    }


def container_env(
    container: dict[str, Any],
    secrets: Mapping[str, Mapping[str, str]],
    pod_fields: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The container's environment as the kubelet makes it: values as written, each
    ``secretKeyRef`` resolved from the Secret (an optional reference to a missing key is left
    out; a required one would keep the container from starting, so the test fails), each
    ``fieldRef`` from ``pod_fields`` and the optional ``configMapKeyRef`` of the trace left
    out. Any other source fails the test: resolve it here first."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        assert set(item) <= {"name", "value", "valueFrom"}, item
        if "valueFrom" not in item:
            env[item["name"]] = item.get("value", "")
            continue
        if "fieldRef" in item["valueFrom"]:
            env[item["name"]] = (pod_fields or {})[item["valueFrom"]["fieldRef"]["fieldPath"]]
            continue
        if "configMapKeyRef" in item["valueFrom"]:
            # Only the trace a job hands the pod (kubernetes/trace.py), applied by the job,
            # not one of the rendered objects: without it the reference is optional and left out.
            assert item["valueFrom"]["configMapKeyRef"]["optional"] is True, item
            continue
        assert set(item["valueFrom"]) == {"secretKeyRef"}, item
        ref = item["valueFrom"]["secretKeyRef"]
        data = secrets.get(ref["name"], {})
        if ref["key"] not in data:
            assert ref.get("optional"), f"{item['name']}: Secret {ref['name']} lacks {ref['key']}"
            continue
        env[item["name"]] = data[ref["key"]]
    assert not container.get("envFrom")
    return env


def volume_mounts(
    pod: dict[str, Any],
    container: dict[str, Any],
    objects: Mapping[tuple[str, str], dict[str, Any]],
    at: Path,
) -> dict[str, Path]:
    """Each Secret, projected-Secret or ConfigMap volume the container mounts, written as files
    (one per key, or per listed item) under ``at``: mount path -> local folder. Anything else
    (an emptyDir, a data volume) is the machine's own here."""

    def data(kind: str, name: str) -> dict[str, str]:
        found = objects[(kind, name)]
        return dict(found.get("stringData" if kind == "Secret" else "data", {}))

    def files(kind: str, source: dict[str, Any]) -> dict[str, str]:
        values = data(kind, source["secretName" if kind == "Secret" else "name"])
        items = source.get("items")
        if not items:
            return values
        return {item["path"]: values[item["key"]] for item in items}

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounted = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        if "secret" in volume:
            written = files("Secret", volume["secret"])
        elif "configMap" in volume:
            written = files("ConfigMap", volume["configMap"])
        elif "projected" in volume:
            written = {}
            for source in volume["projected"]["sources"]:
                assert set(source) == {"secret"}, f"unexpected projected source {source}"
                ref = source["secret"]
                written.update(files("Secret", {"secretName": ref["name"], **ref}))
        else:
            continue
        folder = at / f"{container['name']}-{mount['name']}"
        folder.mkdir(mode=0o700)
        for key, value in written.items():
            (folder / key).write_text(value)
        mounted[mount["mountPath"].rstrip("/") + "/"] = folder
    return mounted


def stand_in(env: Mapping[str, str], table: list[tuple[str, str, str]]) -> dict[str, str]:
    """``env`` with each (variable, cluster name, local stand-in) of ``table`` swapped, the
    cluster name found exactly once in the variable's value; all else unchanged."""
    local = dict(env)
    for variable, cluster_name, here in table:
        assert env[variable].count(cluster_name) == 1, (variable, cluster_name)
        local[variable] = env[variable].replace(cluster_name, here)
    return local


def host_is_the_pod_itself(url: str, instance_names: set[str]) -> bool:
    host = urlsplit(url).hostname or ""
    if host in instance_names or host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


async def make_tenant_database(
    server: EmbeddedPostgres,
    pod: dict[str, Any],
    objects: Mapping[tuple[str, str], dict[str, Any]],
    at: Path,
) -> None:
    """What the postgres image does at its first start with the rendered container: its
    superuser POSTGRES_USER gets the password of POSTGRES_PASSWORD_FILE, the database
    POSTGRES_DB is made, then the initdb.d script runs the rendered ensure step, which gives the
    instance a role of its own (least privilege) with the password of the ``database`` Secret.
    The embedded server's bootstrap superuser is ``postgres``, as in the image; it asks every
    connection for a password where the image trusts its own socket, so the step gets it."""
    [container] = pod["containers"]
    env = container_env(container, secrets_of(objects))
    mounts = volume_mounts(pod, container, objects, at)
    superuser_password = file_in(mounts, env["POSTGRES_PASSWORD_FILE"]).read_text()
    assert env["POSTGRES_USER"] == "postgres"
    conn = await asyncpg.connect(server.url)
    try:
        await conn.execute(
            await conn.fetchval(
                "SELECT format('ALTER ROLE postgres PASSWORD %L', $1::text)", superuser_password
            )
        )
        await conn.execute(
            await conn.fetchval("SELECT format('CREATE DATABASE %I', $1::text)", env["POSTGRES_DB"])
        )
    finally:
        await conn.close()
    [initdb] = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == "initdb"]
    [step] = [p for p in mounts[initdb.rstrip("/") + "/"].iterdir()]
    # The initdb.d script runs the ensure step at its mounted path: run that one, from the
    # rendered ConfigMap, with its folders where the volumes were written here.
    assert "ensure-instance-role.sh" in step.read_text()
    scripts = [f for f in mounts.values() if (f / "ensure-instance-role.sh").exists()]
    secrets = [f for f in mounts.values() if (f / "superuser-password").exists()]
    done = await asyncio.to_thread(
        subprocess.run,
        ["sh", str(scripts[0] / "ensure-instance-role.sh")],
        env={
            "PATH": f"{postgres_bin_dir()}:/usr/bin:/bin",
            "PGHOST": "127.0.0.1",
            "PGPORT": str(server.port),
            "PGPASSWORD": superuser_password,
            "POSTGRES_USER": env["POSTGRES_USER"],
            "POSTGRES_DB": env["POSTGRES_DB"],
            "IOTISTIC_POSTGRES_SECRETS": str(secrets[0]),
            "IOTISTIC_POSTGRES_SCRIPTS": str(scripts[0]),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def file_in(mounts: Mapping[str, Path], path: str) -> Path:
    """The local file written for ``path`` inside the container."""
    for mount, folder in mounts.items():
        if path.startswith(mount):
            return folder / path[len(mount) :]
    raise AssertionError(f"{path} is in no mounted volume")


async def run_dynsec_init(
    pod: dict[str, Any],
    objects: Mapping[tuple[str, str], dict[str, Any]],
    data_dir: Path,
    at: Path,
) -> None:
    """The broker's rendered init container, run here: its command, its environment, its data
    volume (/mosquitto/data) as ``data_dir`` and its Secret volumes written under ``at``."""
    [init] = pod["initContainers"]
    env = container_env(init, secrets_of(objects))
    paths = {str(Path(DYNSEC_FILE).parent): str(data_dir)}
    paths.update(
        (mount.rstrip("/"), str(folder))
        for mount, folder in volume_mounts(pod, init, objects, at).items()
    )
    command = list(init["command"])
    for mount, here in paths.items():
        command = [part.replace(mount, here) for part in command]
    process = await asyncio.create_subprocess_exec(
        *command,
        env={"PATH": os.environ["PATH"], **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, output.decode()
    (data_dir / Path(DYNSEC_FILE).name).chmod(0o600)


@contextlib.asynccontextmanager
async def running(command: list[str], env: dict[str, str], log: Path) -> AsyncIterator[None]:
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *command, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        yield
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


async def test_a_customer_signs_in_through_the_instance_run_with_its_rendered_environment(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    urls = control_plane.urls
    async with httpx.AsyncClient(base_url=urls["signup"], timeout=30) as signup:
        signed = await signup.post(
            "/api/customers/signup",
            json={"email": "k8s@example.com", "password": PASSWORD, "company_name": "Kube Air"},
        )
        assert signed.status_code == 201, signed.text
        customer_id = signed.json()["customer"]["customer_id"]
        token = (
            await signup.post(
                "/api/customers/login", json={"email": "k8s@example.com", "password": PASSWORD}
            )
        ).json()["token"]
        auth = {"Authorization": f"Bearer {token}"}
        me = await eventually(
            lambda: signup.get("/api/customers/me", headers=auth),
            lambda r: r.json()["deployment"]["status"] == "ready",
            timeout=60,
            what="the instance applied to the cluster and reported ready",
        )
    license_jwt = me.json()["license"]["jwt"]

    # --- What the provisioner applied to the (stand-in) cluster.
    ns = namespace_of(customer_id, KubernetesSettings())
    applied = objects_in(control_plane.cluster, ns)
    secrets = secrets_of(applied)
    assert secrets["license"]["license.jwt"] == license_jwt  # the platform's real license
    pod = applied[("Deployment", "instance")]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    # STAND-IN values for what the kubelet knows of the pod, should the env name any.
    pod_fields = {"metadata.namespace": ns, "metadata.name": "instance-standin-pod"}
    rendered = container_env(container, secrets, pod_fields)

    # The variables whose absence made the instance ask itself (the code before this change
    # rendered none of them), and none of the addresses is the pod's own.
    assert {"CONTROL_PLANE_URL", "USAGE_URL", "USAGE_TOKEN", "USAGE_REPORT_SECONDS"} <= set(
        rendered
    )
    own = {"instance", f"instance.{ns}", f"instance.{ns}.svc"}
    own.add(host_of(customer_id, KubernetesSettings()))
    for variable in ("CONTROL_PLANE_URL", "USAGE_URL", "LICENSE_JWKS_URL"):
        assert not host_is_the_pod_itself(rendered[variable], own), variable
    assert rendered["CONTROL_PLANE_URL"] == CLUSTER_URLS["signup"]
    assert rendered["USAGE_URL"] == CLUSTER_URLS["billing"]
    assert rendered["USAGE_REPORT_SECONDS"] == "1.0"
    assert rendered["USAGE_TOKEN"] and rendered["LOGIN_RELAY_KEY"]

    # --- The tenant's own Postgres and Mosquitto, given their users as their StatefulSets do.
    tenant_postgres = EmbeddedPostgres(tmp_path / "tenant-postgres" / "data")
    await asyncio.to_thread(tenant_postgres.start)
    broker = EmbeddedMosquitto(tmp_path / "tenant-mosquitto")
    try:
        postgres_pod = applied[("StatefulSet", "postgres")]["spec"]["template"]["spec"]
        await make_tenant_database(tenant_postgres, postgres_pod, applied, tmp_path)
        broker_pod = applied[("StatefulSet", "mosquitto")]["spec"]["template"]["spec"]
        await run_dynsec_init(broker_pod, applied, broker.data_dir, tmp_path)
        await asyncio.to_thread(broker.start)  # the dynamic-security file is there: kept

        # --- The instance, as its container runs, with the cluster names mapped to local
        # servers by this table only.
        mounts = volume_mounts(pod, container, applied, tmp_path)
        [(license_mount, license_folder)] = mounts.items()
        port = free_port()
        table = [
            ("DATABASE_URL", f"@postgres.{ns}.svc:5432/", f"@127.0.0.1:{tenant_postgres.port}/"),
            ("MQTT_HOST", "mosquitto", broker.host),
            ("MQTT_PORT", "1883", str(broker.port)),
            ("CONTROL_PLANE_URL", CLUSTER_URLS["signup"], urls["signup"]),
            ("USAGE_URL", CLUSTER_URLS["billing"], urls["billing"]),
            ("LICENSE_JWKS_URL", CLUSTER_URLS["licensing"], urls["licensing"]),
            ("LICENSE_FILE", license_mount, f"{license_folder}/"),
            ("HTTP_HOST", "0.0.0.0", "127.0.0.1"),  # noqa: S104 - the pod's address, mapped
            ("HTTP_PORT", str(INSTANCE_PORT), str(port)),
        ]
        env = stand_in(rendered, table)
        mapped = {variable for variable, _, _ in table}
        assert all(env[k] == v for k, v in rendered.items() if k not in mapped)
        # Nothing else names the cluster: a new variable that does must join the table.
        for variable, value in env.items():
            assert ".svc" not in value and "/etc/iotistic" not in value, variable
        process_env = {
            **{k: os.environ[k] for k in MACHINE_ENV if k in os.environ},
            **IMAGE_ENV,
            **env,
        }
        log = tmp_path / "instance.log"
        async with (
            running([IOTISTIC, *container["args"]], process_env, log),
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}",
                timeout=15,
                # The ingress controller in front appends the browser's address.
                headers={"X-Forwarded-For": "203.0.113.7"},
            ) as instance,
        ):
            try:
                await eventually(
                    lambda: instance.get("/health/ready"),
                    lambda r: r.status_code == 200,
                    timeout=60,
                    what="the instance ready",
                )
            except AssertionError:
                raise AssertionError(log.read_text()[-4000:]) from None
            assert (await instance.get("/api/license")).status_code == 401

            # Signed in through the dashboard, which relays the sign-in to signup.
            login = await instance.post(
                "/dashboard/login", json={"email": "k8s@example.com", "password": PASSWORD}
            )
            assert login.status_code == 200, (login.text, log.read_text()[-2000:])
            held = await instance.get("/api/license")
            assert held.status_code == 200, held.text
            assert held.json()["customer_id"] == customer_id
            assert held.json()["status"] == "active"
            wrong = await instance.post(
                "/dashboard/login", json={"email": "k8s@example.com", "password": "not it"}
            )
            assert wrong.status_code == 401

            # The instance made its ingest client with the rendered password and client id,
            # through the broker admin the init container created.
            mqtt = secrets["mqtt"]
            async with DynSec(
                broker.host, broker.port, mqtt["admin-username"], mqtt["admin-password"]
            ) as dynsec:
                client = await dynsec.get_client(mqtt["username"])
            assert client is not None and client["clientid"] == mqtt["client-id"]

            # Its usage reached billing (this sign-in's API request counted).
            today = datetime.now(UTC).date().isoformat()
            async with httpx.AsyncClient(base_url=urls["billing"], timeout=10) as billing:
                usage = await eventually(
                    lambda: billing.get("/api/billing/usage", headers=auth),
                    lambda r: any(
                        d["day"] == today and d["api_requests"] >= 1 for d in r.json()["days"]
                    ),
                    timeout=30,
                    what="today's usage reported to billing",
                )
            day = next(d for d in usage.json()["days"] if d["day"] == today)
            assert day["storage_bytes"] > 0
    finally:
        await asyncio.to_thread(broker.stop)
        await asyncio.to_thread(tenant_postgres.stop)


def test_usage_goes_to_usage_url_or_else_to_the_control_plane() -> None:
    def settings(**extra: object) -> InstanceSettings:
        return InstanceSettings(
            instance_customer_id="c-1",
            database_url="postgresql://u@127.0.0.1:5432/d",
            license_jwks_url="http://127.0.0.1:8080/.well-known/jwks.json",
            control_plane_url="http://signup.cp.svc:8080/",
            **extra,  # type: ignore[arg-type]
        )

    pool: Any = None
    assert UsageReporter(settings(), lambda: pool).url == (
        "http://signup.cp.svc:8080/api/instances/c-1/usage"
    )
    assert UsageReporter(settings(usage_url="http://billing.cp.svc:8080"), lambda: pool).url == (
        "http://billing.cp.svc:8080/api/instances/c-1/usage"
    )


def test_the_provisioner_renders_its_urls_and_refuses_the_pods_own() -> None:
    spec = InstanceSpec(
        customer_id="c-2",
        plan="starter",
        license_jwt="h.c.s",
        license_id="lic",
        jwks_url="http://licensing.cp.svc:8080/.well-known/jwks.json",
    )
    signup_only = ProvisionerSettings(
        provisioner_backend="kubernetes",
        control_plane_url="http://signup.cp.svc:8080",
        license_jwks_url=spec.jwks_url,
    )
    check_reachable_from_pods(signup_only)
    objects = customer_objects(
        spec, kubernetes_settings(signup_only), b"s" * 40, usage_secret=USAGE_SECRET
    )
    by = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    [container] = by[("Deployment", "instance")]["spec"]["template"]["spec"]["containers"]
    env = container_env(container, secrets_of(by))
    # Without USAGE_URL, usage goes where sign-ins go (one address for the whole control plane).
    assert env["USAGE_URL"] == env["CONTROL_PLANE_URL"] == "http://signup.cp.svc:8080"
    assert env["USAGE_REPORT_SECONDS"] == "300.0"
    from contracts.credentials import instance_usage_token

    assert env["USAGE_TOKEN"] == instance_usage_token(USAGE_SECRET, "c-2")
    # The token is in a Secret, never in the pod template.
    assert next(
        e["valueFrom"]["secretKeyRef"] for e in container["env"] if e["name"] == "USAGE_TOKEN"
    ) == {"name": "control-plane", "key": "usage-token"}
    # The defaults are the local backend's loopback addresses: in a pod, the instance itself.
    with pytest.raises(ConfigError, match="CONTROL_PLANE_URL"):
        check_reachable_from_pods(ProvisionerSettings(license_jwks_url=spec.jwks_url))
    for variable, url in (
        ("usage_url", "http://localhost:8080"),
        ("license_jwks_url", "http://0.0.0.0:8080/.well-known/jwks.json"),
        ("control_plane_url", "http://[::1]:8080"),
    ):
        with pytest.raises(ConfigError, match=variable.upper()):
            check_reachable_from_pods(msgspec.structs.replace(signup_only, **{variable: url}))


def test_the_deployment_gives_the_instance_what_the_local_backend_gives_it(tmp_path: Path) -> None:
    """Every variable the local backend sets is in the Deployment, with the same value where
    both derive it from the same settings; the differences are the ones named here."""
    from services.provisioner.backends.local.backend import LocalBackend
    from services.provisioner.backends.local.environment import INHERITED
    from services.provisioner.backends.local.processes import MARKER

    settings = ProvisionerSettings(
        provisioner_secret=PROVISIONER_SECRET,
        usage_secret=USAGE_SECRET,
        login_relay_secret=LOGIN_RELAY_SECRET,
        control_plane_url="http://signup.cp.svc:8080",
        license_jwks_url="http://licensing.cp.svc:8080/.well-known/jwks.json",
        instance_usage_report_seconds=42.0,
        alert_webhook_allowed_cidrs="10.9.0.0/16",
        local_instances_dir=str(tmp_path),
    )
    spec = InstanceSpec(
        customer_id="c-3",
        plan="starter",
        license_jwt="h.c.s",
        license_id="lic",
        jwks_url=settings.license_jwks_url,
    )

    def no_pool() -> Any:
        raise AssertionError("the environment needs no database")

    local = LocalBackend(settings, no_pool)._environment("c-3", 9000, "postgresql://x@h/d")
    objects = customer_objects(
        spec,
        kubernetes_settings(settings),
        PROVISIONER_SECRET.encode(),
        LOGIN_RELAY_SECRET,
        USAGE_SECRET,
    )
    by = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    [container] = by[("Deployment", "instance")]["spec"]["template"]["spec"]["containers"]
    rendered = container_env(container, secrets_of(by))
    # Local only: the process's own environment (the image has its own), the mark the local
    # backend finds its processes by, and WARNING for hundreds of log files on one disk (the
    # kubelet rotates a pod's log: the instance's INFO). Kubernetes only: the ingress in front,
    # devices' WebSockets address through it, and billing's own Service.
    assert set(local) - set(rendered) == {MARKER, "LOG_LEVEL"} | (set(INHERITED) & set(local))
    assert set(rendered) - set(local) == {"MQTT_PUBLIC_URLS", "TRUSTED_PROXY_HOPS", "USAGE_URL"}
    for same in (
        "INSTANCE_CUSTOMER_ID",
        "LICENSE_JWKS_URL",
        "CONTROL_PLANE_URL",
        "USAGE_TOKEN",
        "USAGE_REPORT_SECONDS",
        "LOGIN_RELAY_KEY",
        "MONITORING_TOKEN",
        "ALERT_WEBHOOK_ALLOWED_CIDRS",
    ):
        assert rendered[same] == local[same] != "", same
