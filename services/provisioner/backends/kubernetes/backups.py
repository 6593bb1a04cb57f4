"""Each tenant's backups: a daily ``pg_dump`` into its "backups" volume, and the restore drill.

The scripts live once, in ``tenant_backup/`` next to this module (POSIX sh: ``backup.sh``,
``restore.sh``, ``drill.sh`` and the ``common.sh`` they share); the ConfigMap
``tenant-backup`` carries them as they are, and the CronJob and the drill's Job run them from
it, in the tenant's Postgres image (``pg_dump`` of the server's own major version). The tests
run the same files with the same environment against a real Postgres.

Why a CronJob and not CloudNativePG: an operator and object storage are two more systems that
cannot run or be tested here, and a logical dump restores anywhere (another cluster, a laptop).
A volume in the same cluster is no off-site copy: an operator adds one (volume snapshots of
the "backups" claim copied off the cluster, or an rclone sidecar to object storage).

The broker's state goes with each dump: devices' passwords are shown once and exist only as
hashes in Mosquitto's dynamic-security file on the broker's volume (``data-mosquitto-0``,
ReadWriteOnce, the file 0600 and the broker's own). The backup pod mounts that volume
read-only, on the broker's node (a required podAffinity to the broker's pod: ReadWriteOnce
lets several pods of one node use a volume), as the broker's user, and copies the file next to
the dump. Mosquitto's persistence file (``mosquitto.db``: retained messages, and QoS 1
messages queued for offline sessions) is not copied: readings are in Postgres, and a day-old
queue or retained state replayed to devices after a restore would be stale, not lost data.
The restore writes the file back with the broker stopped (it reads the file only at start).
What co-location costs: while the broker has no pod (scaled to 0, unschedulable) a backup
waits for it, Postgres's dump included; while a backup runs, a broker pod rescheduled to
another node waits for the volume until the backup ends; and the "backups" volume must be in
the broker volume's zone (a new tenant's is: its first user is the backup pod, on the broker's
node; an older tenant's "backups" volume bound in another zone must be moved).
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).with_name("tenant_backup")
SCRIPT_NAMES = ("common.sh", "backup.sh", "restore.sh", "drill.sh")
CONFIG_MAP = "tenant-backup"
CRONJOB = "tenant-backup"
SCRIPTS_PATH = "/opt/tenant-backup"
BACKUPS_PATH = "/backups"
DB_FILES_PATH = "/etc/tenant-database"
# The schema of the instance's tables, which the drill counts.
INSTANCE_SCHEMA = "instance"
RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
    "readOnlyRootFilesystem": True,
}
# The backup pods' user and group: the broker's (manifests.mosquitto.MOSQUITTO_UID; a test
# keeps them equal), the one user that can read its 0600 dynamic-security file, and who owns the
# file a restore writes back. Every backup pod runs as it, so the backups volume has one group (its
# fsGroup). They reach Postgres over the network and touch no file of its volume. libpq and psql
# need no passwd entry for it, since PGUSER is always given.
BACKUP_UID = 11883
# The broker's data volume (its StatefulSet's claim template "data", pod mosquitto-0), where
# the backup pod reads and the restore writes the dynamic-security file.
BROKER_CLAIM = "data-mosquitto-0"
BROKER_PATH = "/mosquitto-data"
BROKER_FILE = "dynamic-security.json"
BROKER_LABELS = {"app.kubernetes.io/name": "mosquitto"}


@cache
def scripts() -> dict[str, str]:
    """The scripts, by file name, as the ConfigMap carries them."""
    return {name: (SCRIPTS / name).read_text() for name in SCRIPT_NAMES}


def scripts_hash() -> str:
    """Changes when any script does (a pod template annotation, so a new script is used)."""
    digest = hashlib.sha256()
    for name, text in sorted(scripts().items()):
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()[:16]


def config_map(meta: dict[str, Any]) -> dict[str, Any]:
    """The ConfigMap ``tenant-backup`` with the scripts."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": scripts()}


def schedule_of(customer_id: str, hours: tuple[int, int] = (1, 5)) -> str:
    """A daily cron schedule at a minute of the night that the customer id decides, so a
    thousand tenants do not dump at the same minute. ``hours``: from, to (exclusive), UTC."""
    n = int.from_bytes(hashlib.sha256(customer_id.encode()).digest()[:4], "big")
    span = (hours[1] - hours[0]) * 60
    minute_of_window = n % span
    return f"{minute_of_window % 60} {hours[0] + minute_of_window // 60} * * *"


def dump_env(kept: int | None = None) -> list[dict[str, Any]]:
    """What the scripts read: the Postgres Service, the folder of the tenant's ``database``
    Secret (user, password and database, as files), the backup folder and (for backups) how
    many dumps to keep."""
    env = [
        {"name": "PGHOST", "value": "postgres"},
        {"name": "PGPORT", "value": "5432"},
        {"name": "DATABASE_SECRET_DIR", "value": DB_FILES_PATH},
        {"name": "BACKUP_DIR", "value": BACKUPS_PATH},
    ]
    if kept is not None:
        env.append({"name": "BACKUP_KEEP", "value": str(kept)})
    return env


# The instance's own role (owner of its database and of everything the instance made): what
# backups dump as, and what a restore restores as, so that the instance owns what comes back.
INSTANCE_CREDENTIALS: dict[str, Any] = {
    "secret": {
        "secretName": "database",
        "items": [{"key": k, "path": k} for k in ("user", "password", "database")],
    }
}


def superuser_credentials() -> dict[str, Any]:
    """The superuser's password (the ``postgres`` Secret) and the database's name: the drill
    creates and drops its scratch database, which the instance's role may not."""
    return {
        "projected": {
            "sources": [
                {
                    "secret": {
                        "name": "postgres",
                        "items": [{"key": "superuser-password", "path": "password"}],
                    }
                },
                {
                    "secret": {
                        "name": "database",
                        "items": [{"key": "database", "path": "database"}],
                    }
                },
            ]
        }
    }


def broker_env() -> list[dict[str, Any]]:
    """Where the scripts find (backup) or put (restore) the broker's dynamic-security file."""
    return [
        {"name": "BROKER_DIR", "value": BROKER_PATH},
        {"name": "BROKER_FILE", "value": BROKER_FILE},
    ]


# On the node of the broker's pod: its volume is ReadWriteOnce, which several pods of one node
# may use. While the broker has no pod (scaled to 0, not scheduled) a backup waits for it.
WITH_THE_BROKER = {
    "podAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [
            {
                "labelSelector": {"matchLabels": BROKER_LABELS},
                "topologyKey": "kubernetes.io/hostname",
            }
        ]
    }
}


def _pod(
    image: str,
    script: str,
    env: list[dict[str, Any]],
    credentials: dict[str, Any] = INSTANCE_CREDENTIALS,
    broker: str | None = None,
) -> dict[str, Any]:
    """The pod of a backup workload; ``broker``: "read" mounts the broker's volume read-only on
    the broker's node, "write" mounts it writable (the broker stopped)."""
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": BACKUP_UID,
            "runAsGroup": BACKUP_UID,
            "fsGroup": BACKUP_UID,
            # Volumes whose root already has the group are not walked again (the broker's has
            # it from the broker's own pod, which runs as the same user and group).
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(image, script, env)],
        "volumes": [
            {"name": "scripts", "configMap": {"name": CONFIG_MAP}},
            {"name": "database", **credentials},
            {"name": "backups", "persistentVolumeClaim": {"claimName": "backups"}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if broker is not None:
        _mount_broker(pod, read_only=broker == "read")
    return pod


def _container(image: str, script: str, env: list[dict[str, Any]]) -> dict[str, Any]:
    """The container that runs ``script`` from the ConfigMap."""
    return {
        "name": "backup",
        "image": image,
        "imagePullPolicy": "Always",
        "command": ["sh", f"{SCRIPTS_PATH}/{script}"],
        "env": env,
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "500m", "memory": "512Mi"},
        },
        "securityContext": RESTRICTED,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "scripts", "mountPath": SCRIPTS_PATH, "readOnly": True},
            {"name": "database", "mountPath": DB_FILES_PATH, "readOnly": True},
            {"name": "backups", "mountPath": BACKUPS_PATH},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108
        ],
    }


def _mount_broker(pod: dict[str, Any], read_only: bool) -> None:
    """Mount the broker's volume in ``pod``'s container; read-only, on the broker's node."""
    [container] = pod["containers"]
    container["volumeMounts"].append(
        {"name": "broker", "mountPath": BROKER_PATH, "readOnly": read_only}
    )
    # Read-only in the container only, not on the claim: a claim read-only would ask the
    # driver to attach the volume read-only, which some do (the attachment is the node's,
    # shared with the broker's pod should that start next).
    pod["volumes"].append({"name": "broker", "persistentVolumeClaim": {"claimName": BROKER_CLAIM}})
    if read_only:
        pod["affinity"] = WITH_THE_BROKER


def cronjob(
    meta: dict[str, Any], customer_id: str, image: str, kept: int, schedule: str | None = None
) -> dict[str, Any]:
    """The CronJob ``tenant-backup``: ``backup.sh`` daily, never two at once, keeping ``kept``
    dumps; a failed run is retried twice and kept for a look (and the disk alerts)."""
    labels = {"app.kubernetes.io/name": "tenant-backup"}
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": meta,
        "spec": {
            "schedule": schedule or schedule_of(customer_id),
            "timeZone": "Etc/UTC",
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": 3600,
            "successfulJobsHistoryLimit": 1,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "spec": {
                    "backoffLimit": 2,
                    "activeDeadlineSeconds": 6 * 3600,
                    "template": {
                        "metadata": {
                            "labels": labels,
                            "annotations": {"iotistic.io/scripts-sha256": scripts_hash()},
                        },
                        "spec": _pod(
                            image, "backup.sh", [*dump_env(kept), *broker_env()], broker="read"
                        ),
                    },
                }
            },
        },
    }


def drill_job(meta: dict[str, Any], image: str, superuser: str) -> dict[str, Any]:
    """A Job that runs ``drill.sh`` once as the ``superuser``: the newest dump restored into a
    scratch database, counted and dropped; its summary is the container's termination
    message."""
    env = [
        *dump_env(),
        {"name": "PGUSER", "value": superuser},
        {"name": "DRILL_SCHEMA", "value": INSTANCE_SCHEMA},
    ]
    return _job(meta, image, "drill.sh", env, "restore-drill", superuser_credentials())


def restore_job(meta: dict[str, Any], image: str, dump: str | None = None) -> dict[str, Any]:
    """A Job that runs ``restore.sh`` once over the tenant's own database: the schemas the
    dump holds dropped and restored, in one transaction; the newest intact dump, or ``dump``
    (a file name on the backups volume); and the dump's copy of the broker's dynamic-security
    file written back into the broker's volume (the broker scaled to 0 meanwhile)."""
    env = [*dump_env(), *broker_env(), {"name": "RESTORE_CLEAN", "value": "1"}]
    if dump:
        env.append({"name": "BACKUP_FILE", "value": dump})
    return _job(meta, image, "restore.sh", env, "restore", broker="write")


def _job(
    meta: dict[str, Any],
    image: str,
    script: str,
    env: list[dict[str, Any]],
    name: str,
    credentials: dict[str, Any] = INSTANCE_CREDENTIALS,
    broker: str | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": 6 * 3600,
            # The Job and its pod go an hour after they end; the command has read them by then.
            "ttlSecondsAfterFinished": 3600,
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": name}},
                "spec": _pod(image, script, env, credentials, broker),
            },
        },
    }
