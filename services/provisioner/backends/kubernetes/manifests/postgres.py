"""The tenant's Postgres: a StatefulSet of one pod, its headless Service and the ConfigMap of
the scripts that keep the instance's role in step (``postgres_scripts``)."""

from __future__ import annotations

import hashlib
from typing import Any

from services.provisioner.backends.kubernetes.manifests.metadata import (
    CREDENTIALS_HASH,
    object_meta,
)
from services.provisioner.backends.kubernetes.manifests.pods import (
    NO_CLUSTER_ACCESS,
    SECRET_FILE_MODE,
    claim_spec,
    pod_security,
    restricted,
    service,
    stateful_set,
)
from services.provisioner.backends.kubernetes.manifests.postgres_scripts import (
    PG_DATABASE,
    PG_SCRIPTS_DIR,
    PG_SECRETS_DIR,
    PG_SUPERUSER,
    POSTGRES_SCRIPTS,
)
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings

# Tenants' Postgres and Mosquitto run as users above 10000, clear of any host's own users.
POSTGRES_UID = 10999
# Postgres answers (accepting connections, or still starting or recovering: exit 1): alive.
PG_ANSWERS = ["sh", "-c", "pg_isready -q; test $? -le 1"]
# The keys of the Secrets the pod mounts: the instance role's, and the superuser's password.
_ROLE_KEYS = ("user", "password")
_SUPERUSER = "superuser-password"


def postgres_service(ns: str, cid: str) -> dict[str, Any]:
    """The headless Service ``postgres`` (5432)."""
    return service(
        "postgres", ns, cid, [{"name": "postgres", "port": 5432, "targetPort": 5432}], True
    )


def scripts_config_map(ns: str, cid: str) -> dict[str, Any]:
    """The ConfigMap ``postgres-scripts``."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta("postgres-scripts", ns, cid),
        "data": POSTGRES_SCRIPTS,
    }


def postgres(ns: str, cid: str, settings: KubernetesSettings, credentials: str) -> dict[str, Any]:
    """The StatefulSet ``postgres``; ``credentials``, the hash of its passwords, rolls it when
    they are rotated."""
    claim = claim_spec("10Gi", settings)
    scripts_hash = hashlib.sha256(
        "\0".join(f"{k}={v}" for k, v in sorted(POSTGRES_SCRIPTS.items())).encode()
    ).hexdigest()[:16]
    # New scripts or rotated passwords restart Postgres, whose start keeps the instance role in
    # step with the Secret.
    annotations = {"iotistic.io/config-sha256": scripts_hash, CREDENTIALS_HASH: credentials}
    pod = {
        **NO_CLUSTER_ACCESS,
        "securityContext": {
            # A user of its own, not the image's (999: a host's system range); the official
            # image runs as any user (its nss_wrapper), owning what it makes in the volume
            # (fsGroup gives it the volume's root).
            **pod_security(POSTGRES_UID),
            "fsGroupChangePolicy": "OnRootMismatch",
        },
        "containers": [_container(settings)],
        "volumes": _volumes(),
    }
    return stateful_set("postgres", ns, cid, annotations, pod, claim)


def _container(settings: KubernetesSettings) -> dict[str, Any]:
    return {
        "name": "postgres",
        "image": settings.postgres_image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "postgres", "containerPort": 5432}],
        "env": [
            # Not secrets: the names. The passwords are files.
            {"name": "POSTGRES_USER", "value": PG_SUPERUSER},
            {"name": "POSTGRES_DB", "value": PG_DATABASE},
            {"name": "POSTGRES_PASSWORD_FILE", "value": f"{PG_SECRETS_DIR}/superuser-password"},
            {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"},
        ],
        **_probes(),
        "resources": {
            "requests": {"cpu": "250m", "memory": "512Mi"},
            "limits": {"cpu": "1", "memory": "1Gi"},
        },
        "securityContext": restricted(),
        "volumeMounts": [
            {"name": "data", "mountPath": "/var/lib/postgresql/data"},
            # The root filesystem is read-only: its socket and lock file, and bash's and
            # nss_wrapper's temporary files.
            {"name": "run", "mountPath": "/var/run/postgresql"},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108
            {"name": "secrets", "mountPath": PG_SECRETS_DIR, "readOnly": True},
            {"name": "scripts", "mountPath": PG_SCRIPTS_DIR, "readOnly": True},
            {"name": "initdb", "mountPath": "/docker-entrypoint-initdb.d", "readOnly": True},
        ],
    }


def _probes() -> dict[str, Any]:
    """The container's postStart hook (which keeps the instance role in step) and probes."""
    return {
        "lifecycle": {
            "postStart": {"exec": {"command": ["sh", f"{PG_SCRIPTS_DIR}/post-start.sh"]}}
        },
        # Over TCP: the first start's temporary server listens on its socket only, and the
        # instance comes over TCP.
        "readinessProbe": {
            "exec": {"command": ["pg_isready", "-q", "-h", "127.0.0.1"]},
            "periodSeconds": 5,
        },
        # Alive while it answers at all: a long crash recovery (or the first initdb) is no
        # reason to kill it.
        "startupProbe": {
            "exec": {"command": PG_ANSWERS},
            "periodSeconds": 5,
            "failureThreshold": 120,
        },
        "livenessProbe": {
            "exec": {"command": PG_ANSWERS},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
    }


def _volumes() -> list[dict[str, Any]]:
    """Scratch folders, the passwords (the instance role's and the superuser's: this pod is
    the only one that mounts the latter) and the scripts, the first-start one apart."""
    secrets = [
        {"secret": {"name": "database", "items": [{"key": k, "path": k} for k in _ROLE_KEYS]}},
        {"secret": {"name": "postgres", "items": [{"key": _SUPERUSER, "path": _SUPERUSER}]}},
    ]
    first_start = "10-instance-role.sh"
    return [
        {"name": "run", "emptyDir": {"sizeLimit": "16Mi"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
        {"name": "secrets", "projected": {"defaultMode": SECRET_FILE_MODE, "sources": secrets}},
        {"name": "scripts", "configMap": {"name": "postgres-scripts", "defaultMode": 0o444}},
        {
            "name": "initdb",
            "configMap": {
                "name": "postgres-scripts",
                "defaultMode": 0o444,
                "items": [{"key": first_start, "path": first_start}],
            },
        },
    ]
