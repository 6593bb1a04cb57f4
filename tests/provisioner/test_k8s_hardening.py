"""The tenant's hardening and its credentials: what the rendered pods may do, the instance's
least-privilege database role (its scripts run on a real Postgres), the broker admin's
rotation (its script run against a real Mosquitto), and a rotation through the kubernetes
backend against the STAND-IN of the API server (tests/k8s_standin.py), since no API server
can run here.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import kubernetes_validate
import pytest
from k8s_standin import (
    KubeStandIn,
    api_client_for,
    backend_running,
    no_progress,
    served,
    starter_spec,
)

from libs.config import ConfigError, load_settings
from libs.db.postgres import migrate, service_migrations
from libs.servers.mosquitto import ADMIN_USER, EmbeddedMosquitto
from libs.servers.postgres import _HBA_MARK, EmbeddedPostgres, postgres_bin_dir
from services.provisioner.app import kubernetes_settings
from services.provisioner.backends.base import BackendError, InstanceSpec, derive_password
from services.provisioner.backends.kubernetes.backend import KubernetesBackend
from services.provisioner.backends.kubernetes.credentials import (
    credentials_generation_of,
    customer_objects,
)
from services.provisioner.backends.kubernetes.manifests.metadata import (
    CREDENTIALS_GENERATION,
    CREDENTIALS_HASH,
    namespace_of,
)
from services.provisioner.backends.kubernetes.manifests.mosquitto import MQTT_POST_START_SH
from services.provisioner.backends.kubernetes.manifests.postgres_scripts import POSTGRES_SCRIPTS
from services.provisioner.backends.kubernetes.manifests.settings import (
    KubernetesSettings,
    pinned_by_digest,
)
from services.provisioner.rotation import rotate_credentials
from services.provisioner.settings import ProvisionerSettings

CUSTOMER = "5d41402a-bc4b-4a76-b971-9d911017c592"
NS = f"customer-{CUSTOMER}"
SECRET = b"h" * 40
K8S_VERSION = "1.37.0"


def spec(license_id: str = "lic-1") -> InstanceSpec:
    return starter_spec(CUSTOMER, license_id=license_id)


def objects(generation: int = 0) -> dict[tuple[str, str], dict[str, Any]]:
    rendered = customer_objects(
        spec(), KubernetesSettings(), SECRET, "l" * 40, credentials_generation=generation
    )
    return {(o["kind"], o["metadata"]["name"]): o for o in rendered}


def pods() -> dict[str, dict[str, Any]]:
    return {
        name: obj["spec"]["template"]["spec"]
        for (kind, name), obj in objects().items()
        if kind in ("Deployment", "StatefulSet")
    }


def test_every_tenant_pod_is_locked_down() -> None:
    for name, pod in pods().items():
        assert pod["automountServiceAccountToken"] is False, name
        assert pod["enableServiceLinks"] is False, name
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsGroup"] == security["runAsUser"] == security["fsGroup"]
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert container["resources"]["limits"] and container["resources"]["requests"], where
            assert container["imagePullPolicy"] == "IfNotPresent", where
        for container in pod["containers"]:
            assert "livenessProbe" in container and "readinessProbe" in container, name
    # Postgres writes its socket and lock file, and its entrypoint temporary files, there.
    mounts = {m["mountPath"] for m in pods()["postgres"]["containers"][0]["volumeMounts"]}
    assert {"/var/run/postgresql", "/tmp"} <= mounts  # noqa: S108
    # Its liveness accepts a server that answers while it recovers (pg_isready's status 1).
    postgres = pods()["postgres"]["containers"][0]
    assert postgres["livenessProbe"]["exec"]["command"][-1] == "pg_isready -q; test $? -le 1"
    assert (
        postgres["startupProbe"]["failureThreshold"] * postgres["startupProbe"]["periodSeconds"]
        >= 300
    )


def test_images_are_pinned_and_the_namespace_enforces_restricted() -> None:
    by = objects()
    for kind, name in (("StatefulSet", "postgres"), ("StatefulSet", "mosquitto")):
        for container in by[(kind, name)]["spec"]["template"]["spec"]["containers"]:
            assert pinned_by_digest(container["image"])
    assert not pinned_by_digest("postgres:18")
    assert not pinned_by_digest("postgres:18@sha256:abc")
    labels = by[("Namespace", NS)]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/enforce-version"] == "latest"
    assert labels["pod-security.kubernetes.io/audit"] == "restricted"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    assert labels["iotistic.io/tenant"] == "true"
    # Built-in kinds here; the Gateway API and Envoy Gateway kinds are checked against their
    # own schemas in tests/deploy/test_tenant_manifests.py.
    for obj in by.values():
        if "gateway" not in obj["apiVersion"]:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_one_instance_pod_at_a_time() -> None:
    # Two pods would share the ingest client's MQTT id and throw each other off the broker.
    deployment = objects()[("Deployment", "instance")]["spec"]
    assert deployment["replicas"] == 1
    assert deployment["strategy"] == {"type": "Recreate"}


def test_the_superuser_password_reaches_postgres_only() -> None:
    by = objects()
    superuser = by[("Secret", "postgres")]["stringData"]["superuser-password"]
    database = by[("Secret", "database")]["stringData"]
    assert superuser and superuser != database["password"]
    assert database["user"] == "iotistic"
    assert database["url"].startswith(f"postgresql://iotistic:{database['password']}@")
    for name, pod in pods().items():
        text = str(pod)
        assert ("'postgres'" in text and "superuser-password" in text) == (name == "postgres")
    env = {e["name"]: e for e in pods()["postgres"]["containers"][0]["env"]}
    assert env["POSTGRES_USER"]["value"] == "postgres"
    assert "valueFrom" not in str(env)  # passwords are files, not environment
    # The broker reads its admin credentials from files too.
    assert "valueFrom" not in str(pods()["mosquitto"])


def test_derived_passwords_change_with_the_generation_only() -> None:
    # Generation 0 is the derivation of the versions before rotation: nothing changes.
    from contracts.credentials import derived_secret

    assert derive_password(SECRET, "database", CUSTOMER) == derived_secret(
        SECRET, "database", CUSTOMER
    )
    seen = {derive_password(SECRET, "database", CUSTOMER, g) for g in range(4)}
    assert len(seen) == 4
    with pytest.raises(ValueError, match="0 or more"):
        derive_password(SECRET, "database", CUSTOMER, -1)
    assert credentials_generation_of(None) == 0
    assert credentials_generation_of({"metadata": {"annotations": {}}}) == 0
    assert credentials_generation_of({"metadata": {"annotations": {CREDENTIALS_GENERATION: "3"}}})
    with pytest.raises(BackendError):
        credentials_generation_of({"metadata": {"annotations": {CREDENTIALS_GENERATION: "x"}}})


# --- the instance's database role, on a real Postgres --------------------------------------


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A Postgres that authenticates as the official image's does: local (socket)
    connections trusted, TCP ones by password (scram)."""
    server = EmbeddedPostgres(tmp_path / "pg" / "data")
    server.start()
    try:
        server.stop()
        hba = server.data_dir / "pg_hba.conf"
        hba.write_text(
            f"{_HBA_MARK}\nlocal all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )
        server.start()
        yield server
    finally:
        server.stop()


def _write_secrets(folder: Path, generation: int) -> dict[str, str]:
    by = objects(generation)
    values = {
        "user": by[("Secret", "database")]["stringData"]["user"],
        "password": by[("Secret", "database")]["stringData"]["password"],
        "superuser-password": by[("Secret", "postgres")]["stringData"]["superuser-password"],
    }
    folder.mkdir(exist_ok=True)
    for name, value in values.items():
        (folder / name).write_text(value)
    return values


def _run_script(
    name: str, server: EmbeddedPostgres, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    scripts = tmp_path / "scripts"
    scripts.mkdir(exist_ok=True)
    for key, text in objects()[("ConfigMap", "postgres-scripts")]["data"].items():
        (scripts / key).write_text(text)
    (tmp_path / "hook.log").touch()  # the container's log, which exists there
    env = {
        "PATH": f"{postgres_bin_dir()}:/usr/bin:/bin",
        "PGHOST": str(server._socket_dir),  # as in the pod: its own socket, trusted
        "PGPORT": str(server.port),
        "POSTGRES_USER": "postgres",
        "POSTGRES_DB": "iotistic",
        "IOTISTIC_POSTGRES_SECRETS": str(tmp_path / "secrets"),
        "IOTISTIC_POSTGRES_SCRIPTS": str(scripts),
        "IOTISTIC_LOG_TO": str(tmp_path / "hook.log"),
    }
    return subprocess.run(
        ["sh", str(scripts / name)], env=env, capture_output=True, text=True, timeout=120
    )


def _instance_url(server: EmbeddedPostgres, password: str) -> str:
    return f"postgresql://iotistic:{password}@127.0.0.1:{server.port}/iotistic"


async def test_the_instance_role_owns_its_database_and_nothing_more(
    postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    assert "ensure-instance-role.sh" in POSTGRES_SCRIPTS["10-instance-role.sh"]
    postgres.create_database("iotistic")  # the image's entrypoint makes POSTGRES_DB
    first = _write_secrets(tmp_path / "secrets", 0)
    done = _run_script("ensure-instance-role.sh", postgres, tmp_path)
    assert done.returncode == 0, done.stderr
    assert first["password"] not in done.stdout + done.stderr

    conn = await asyncpg.connect(_instance_url(postgres, first["password"]))
    try:
        # What its migrations do: a schema of its own, tables, rows.
        await conn.execute("CREATE SCHEMA instance")
        await conn.execute("CREATE TABLE instance.readings (id bigint PRIMARY KEY, v real)")
        await conn.execute("INSERT INTO instance.readings VALUES (1, 21.5)")
        role = await conn.fetchrow(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls "
            "FROM pg_roles WHERE rolname = 'iotistic'"
        )
        assert not any(role.values())
        owner = await conn.fetchval(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'iotistic'"
        )
        assert owner == "iotistic"
        for superuser_thing in (
            "CREATE ROLE intruder LOGIN",
            "ALTER ROLE postgres PASSWORD 'x'",
            "ALTER SYSTEM SET work_mem = '1MB'",
            "COPY (SELECT 1) TO PROGRAM 'true'",
            "SELECT rolpassword FROM pg_authid",
            "CREATE DATABASE other",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(superuser_thing)
    finally:
        await conn.close()
    # The superuser has the Secret's password (only Postgres's pod mounts it).
    superuser = await asyncpg.connect(
        f"postgresql://postgres:{first['superuser-password']}@127.0.0.1:{postgres.port}/postgres"
    )
    await superuser.close()

    # A rotation: the next generation's Secret, and Postgres's start keeps the roles in step.
    second = _write_secrets(tmp_path / "secrets", 1)
    assert second["password"] != first["password"]
    hook = _run_script("post-start.sh", postgres, tmp_path)
    assert hook.returncode == 0, hook.stderr
    assert "kept in step" in (tmp_path / "hook.log").read_text()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(_instance_url(postgres, first["password"]))
    conn = await asyncpg.connect(_instance_url(postgres, second["password"]))
    try:
        assert await conn.fetchval("SELECT v FROM instance.readings WHERE id = 1") == 21.5
    finally:
        await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(
            f"postgresql://postgres:{first['superuser-password']}"
            f"@127.0.0.1:{postgres.port}/postgres"
        )
    # Run again (every start does): nothing changes, nothing fails.
    again = _run_script("ensure-instance-role.sh", postgres, tmp_path)
    assert again.returncode == 0, again.stderr


async def test_a_tenant_from_before_gets_an_instance_role_of_its_own(
    postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    # Made by an older version: the instance's role is the cluster's bootstrap superuser and
    # there is no other, and it owns everything the instance made.
    old = _write_secrets(tmp_path / "secrets", 0)
    admin = await asyncpg.connect(postgres.url)
    try:
        await admin.execute("CREATE ROLE stepping_stone SUPERUSER LOGIN PASSWORD 'stone'")
    finally:
        await admin.close()
    stone = await asyncpg.connect(
        f"postgresql://stepping_stone:stone@127.0.0.1:{postgres.port}/postgres"
    )
    try:
        await stone.execute("ALTER ROLE postgres RENAME TO iotistic")
        await stone.execute(f"ALTER ROLE iotistic PASSWORD '{old['password']}'")
        await stone.execute("CREATE DATABASE iotistic OWNER iotistic")
    finally:
        await stone.close()
    made = await asyncpg.connect(_instance_url(postgres, old["password"]))
    try:
        await made.execute("DROP ROLE stepping_stone")
        await made.execute(
            """
            CREATE SCHEMA instance;
            CREATE TYPE instance.level AS ENUM ('low', 'high');
            CREATE TABLE instance.readings (id bigserial PRIMARY KEY, v real, l instance.level);
            CREATE TABLE instance.devices (id bigint GENERATED ALWAYS AS IDENTITY, name text);
            CREATE SEQUENCE instance.tickets;
            CREATE VIEW instance.latest AS SELECT max(id) AS id FROM instance.readings;
            CREATE FUNCTION instance.twice(x int) RETURNS int LANGUAGE sql AS 'SELECT 2 * x';
            CREATE TABLE public.kept (k int);
            INSERT INTO instance.readings (v, l) VALUES (20.5, 'low');
            """
        )
    finally:
        await made.close()

    done = _run_script("ensure-instance-role.sh", postgres, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "a role of its own" in done.stdout and "kept in step" in done.stdout
    # The instance's role: not a superuser, the owner of all it made, its data still there.
    conn = await asyncpg.connect(_instance_url(postgres, old["password"]))
    try:
        assert not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = 'iotistic'")
        owners = await conn.fetch(
            """
            SELECT c.relname, pg_get_userbyid(c.relowner) AS owner FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname IN ('instance', 'public') AND c.relkind IN ('r', 'S', 'v', 'i')
            """
        )
        assert len(owners) >= 8 and {r["owner"] for r in owners} == {"iotistic"}
        others = await conn.fetchval(
            """
            SELECT array[pg_get_userbyid((SELECT nspowner FROM pg_namespace
                                          WHERE nspname = 'instance')),
                         pg_get_userbyid((SELECT typowner FROM pg_type WHERE typname = 'level')),
                         pg_get_userbyid((SELECT proowner FROM pg_proc WHERE proname = 'twice'))]
            """
        )
        assert others == ["iotistic"] * 3
        assert await conn.fetchval("SELECT instance.twice(21)") == 42
        assert await conn.fetchval("SELECT id FROM instance.latest") == 1
        await conn.execute("INSERT INTO instance.readings (v, l) VALUES (21.0, 'high')")
        await conn.execute("INSERT INTO instance.devices (name) VALUES ('d1')")
        assert await conn.fetchval("SELECT nextval('instance.tickets')") == 1
        await conn.execute("CREATE TABLE instance.more (id int)")  # migrations still run
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE ROLE intruder LOGIN")
        roles = {r["rolname"] for r in await conn.fetch("SELECT rolname FROM pg_roles")}
        assert "iotistic_migration" not in roles
    finally:
        await conn.close()
    # The bootstrap superuser is now `postgres`, with the password of the Secret Postgres mounts.
    superuser = await asyncpg.connect(
        f"postgresql://postgres:{old['superuser-password']}@127.0.0.1:{postgres.port}/iotistic"
    )
    try:
        assert await superuser.fetchval("SELECT oid FROM pg_roles WHERE rolname = 'postgres'") == 10
    finally:
        await superuser.close()
    again = _run_script("ensure-instance-role.sh", postgres, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "a role of its own" not in again.stdout


# --- the broker's admin, on a real Mosquitto -------------------------------------------------


def test_the_broker_moves_its_admin_to_the_rotated_password(tmp_path: Path) -> None:
    previous = derive_password(SECRET, "mqtt-admin", CUSTOMER, 0)
    current = derive_password(SECRET, "mqtt-admin", CUSTOMER, 1)
    broker = EmbeddedMosquitto(tmp_path / "broker")
    (broker.data_dir / "admin-password").write_text(previous)  # its dynsec file's admin
    broker.start()
    try:
        admin = tmp_path / "admin"
        admin.mkdir()
        (admin / "admin-username").write_text(ADMIN_USER)
        (admin / "admin-password").write_text(current)
        (admin / "admin-password-previous").write_text(previous)
        script = tmp_path / "post-start.sh"
        script.write_text(MQTT_POST_START_SH)
        (tmp_path / "hook.log").touch()  # the container's log, which exists there
        env = {
            "PATH": "/usr/bin:/bin",
            "IOTISTIC_MQTT_ADMIN": str(admin),
            "IOTISTIC_MQTT_PORT": str(broker.port),
            "IOTISTIC_LOG_TO": str(tmp_path / "hook.log"),
        }
        hook = subprocess.run(["sh", str(script)], env=env, timeout=120, capture_output=True)
        assert hook.returncode == 0
        assert "admin password rotated" in (tmp_path / "hook.log").read_text()

        def works(password: str) -> bool:
            return (
                subprocess.run(
                    [
                        "mosquitto_sub",
                        "-h",
                        "127.0.0.1",
                        "-p",
                        str(broker.port),
                        "-u",
                        ADMIN_USER,
                        "-P",
                        password,
                        "-t",
                        "$SYS/broker/version",
                        "-C",
                        "1",
                        "-W",
                        "5",
                    ],
                    capture_output=True,
                    timeout=30,
                ).returncode
                == 0
            )

        assert works(current) and not works(previous)
        # Again (every start runs it): the password works, nothing to do.
        again = subprocess.run(["sh", str(script)], env=env, timeout=120, capture_output=True)
        assert again.returncode == 0 and works(current)
    finally:
        broker.stop()


# --- rotation through the backend, against the STAND-IN of the API server -------------------


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[KubeStandIn, str]]:
    standin = KubeStandIn()
    async with served(standin) as url:
        yield standin, url


def backend_for(url: str) -> KubernetesBackend:
    return KubernetesBackend(
        KubernetesSettings(),
        SECRET,
        api_client_for(url),
        ready_timeout=20,
        poll_seconds=0.05,
        login_relay_secret="l" * 40,
    )


def _secret_values(standin: KubeStandIn) -> dict[str, dict[str, str]]:
    return {
        path.rsplit("/", 1)[-1]: dict(obj["stringData"])
        for path, obj in standin.objects.items()
        if obj["kind"] == "Secret"
    }


async def test_rotation_changes_the_passwords_and_rolls_the_pods_and_nothing_else(
    cluster: tuple[KubeStandIn, str],
) -> None:
    standin, url = cluster
    backend = backend_for(url)
    async with backend_running(backend):
        with pytest.raises(BackendError, match="nothing to rotate"):
            await backend.rotate_credentials(spec(), no_progress)
        await backend.deploy(spec(), no_progress)
        before = {k: v["metadata"]["generation"] for k, v in standin.objects.items()}
        secrets_before = _secret_values(standin)
        templates_before = {
            k: v["spec"]["template"]["metadata"]["annotations"][CREDENTIALS_HASH]
            for k, v in standin.objects.items()
            if v["kind"] in ("Deployment", "StatefulSet")
        }
        assert await backend.rotate_credentials(spec(), no_progress) == 1
        # A later deploy or update (a retried job, a new license) keeps the new generation.
        await backend.deploy(spec(), no_progress)
        after_deploy = _secret_values(standin)
        await backend.update(spec(), no_progress)
    namespace = standin.objects[f"/api/v1/namespaces/{NS}"]
    assert namespace["metadata"]["annotations"][CREDENTIALS_GENERATION] == "1"
    secrets_after = _secret_values(standin)
    assert after_deploy == secrets_after
    changed = {
        (name, key)
        for name, values in secrets_after.items()
        for key, value in values.items()
        if secrets_before[name].get(key) != value
    }
    assert changed == {
        ("database", "password"),
        ("database", "url"),
        ("postgres", "superuser-password"),
        ("mqtt", "admin-password"),
        ("mqtt", "admin-password-previous"),
        ("mqtt", "password"),
        ("monitoring", "token"),
    }
    # The broker gets the admin's old password to move from; the client id (its session)
    # stays; the license and the relay key (not ours to rotate) stay.
    assert (
        secrets_after["mqtt"]["admin-password-previous"] == secrets_before["mqtt"]["admin-password"]
    )
    assert secrets_after["mqtt"]["client-id"] == secrets_before["mqtt"]["client-id"]
    moved = {k for k, v in standin.objects.items() if v["metadata"]["generation"] != before[k]}
    workloads = {k for k in templates_before}
    assert moved == workloads | {
        f"/api/v1/namespaces/{NS}/secrets/{name}"
        for name in ("database", "postgres", "mqtt", "monitoring")
    }
    for path, old_hash in templates_before.items():
        template = standin.objects[path]["spec"]["template"]["metadata"]["annotations"]
        assert template[CREDENTIALS_HASH] != old_hash
        assert standin.objects[path]["metadata"]["generation"] == before[path] + 1


async def test_rotation_reads_back_a_generation_it_cannot_trust_as_an_error(
    cluster: tuple[KubeStandIn, str],
) -> None:
    standin, url = cluster
    backend = backend_for(url)
    async with backend_running(backend):
        await backend.deploy(spec(), no_progress)
        path = f"/api/v1/namespaces/{NS}"
        standin.objects[path]["metadata"]["annotations"][CREDENTIALS_GENERATION] = "two"
        with pytest.raises(BackendError, match="not a count"):
            await backend.update(spec("lic-2"), no_progress)
    # Nothing was applied with generation 0's passwords over it.
    assert (
        standin.objects[f"/api/v1/namespaces/{NS}/secrets/license"]["stringData"]["license-id"]
        == "lic-1"
    )


async def test_the_rotate_command_rotates_the_customer_of_the_provisioners_records(
    cluster: tuple[KubeStandIn, str], database_url: str
) -> None:
    standin, url = cluster
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, "provisioner", service_migrations("services.provisioner.migrations"))
        await conn.execute(
            "INSERT INTO provisioner.customer_licenses "
            "(customer_id, license_id, plan, jwt, max_devices) VALUES ($1, $2, $3, $4, $5)",
            CUSTOMER,
            "lic-db",
            "starter",
            "header.claims.from-the-records",
            10,
        )
        await conn.execute(
            "INSERT INTO provisioner.customer_licenses "
            "VALUES ('gone', 'l', 'starter', 'j', 10, true)"
        )
    finally:
        await conn.close()
    settings = load_settings(
        ProvisionerSettings,
        {
            "DATABASE_URL": database_url,
            "PROVISIONER_BACKEND": "kubernetes",
            "PROVISIONER_SECRET": SECRET.decode(),
            "LOGIN_RELAY_SECRET": "l" * 40,
        },
    )
    steps: list[str] = []

    async def progress(percent: int, step: str) -> None:
        steps.append(step)

    backend = backend_for(url)
    async with backend_running(backend):
        await backend.deploy(spec("lic-db"), progress)
    assert await rotate_credentials(settings, CUSTOMER, progress, backend=backend) == 1
    assert await rotate_credentials(settings, CUSTOMER, progress, backend=backend) == 2
    assert "credentials generation 2 applied" in steps
    license_secret = standin.objects[f"/api/v1/namespaces/{NS}/secrets/license"]["stringData"]
    assert license_secret["license.jwt"] == "header.claims.from-the-records"
    database = standin.objects[f"/api/v1/namespaces/{NS}/secrets/database"]["stringData"]
    assert database["password"] == derive_password(SECRET, "database", CUSTOMER, 2)
    mqtt = standin.objects[f"/api/v1/namespaces/{NS}/secrets/mqtt"]["stringData"]
    assert mqtt["admin-password-previous"].splitlines() == [
        derive_password(SECRET, "mqtt-admin", CUSTOMER, 1),
        derive_password(SECRET, "mqtt-admin", CUSTOMER, 0),
    ]
    for customer, why in (("gone", "closed"), ("nobody", "no license")):
        with pytest.raises(BackendError, match=why):
            await rotate_credentials(settings, customer, progress, backend=backend)


def test_images_and_namespace_prefix_come_from_the_provisioners_settings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pinned = "registry.example/iotistic:1.2.3@sha256:" + "b" * 64
    settings = load_settings(
        ProvisionerSettings,
        {
            "INSTANCE_IMAGE": pinned,
            "POSTGRES_IMAGE": "mirror.example/postgres:18@sha256:" + "c" * 64,
            "KUBERNETES_NAMESPACE_PREFIX": "tenant-",
        },
    )
    with caplog.at_level(logging.WARNING):
        chosen = kubernetes_settings(settings)
    assert "not pinned" not in caplog.text
    assert chosen.postgres_image.startswith("mirror.example/postgres:18@sha256:")
    assert pinned_by_digest(chosen.mosquitto_image)  # the default: this version's digest
    assert namespace_of(CUSTOMER, chosen) == f"tenant-{CUSTOMER}"
    with pytest.raises(ConfigError, match="POSTGRES_IMAGE 'postgres:18' is not pinned"):
        kubernetes_settings(load_settings(ProvisionerSettings, {"POSTGRES_IMAGE": "postgres:18"}))
    # Our own image, built and loaded locally in a developer's cluster: warned about only.
    with caplog.at_level(logging.WARNING):
        kubernetes_settings(load_settings(ProvisionerSettings, {"INSTANCE_IMAGE": "iot:dev"}))
    assert "INSTANCE_IMAGE 'iot:dev' is not pinned by digest" in caplog.text
