"""The tenant's broker: Mosquitto as a StatefulSet of one pod, on 1883 (MQTT) and 9001 (MQTT
over WebSockets, which the Gateway carries), its Service and its configuration, with the
platform's message size and queue limits and the dynamic-security plugin."""

from __future__ import annotations

import hashlib
from typing import Any

from libs.servers.mosquitto import broker_limits, listener_limits
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
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings

MQTT_ADMIN = "admin"
MQTT_INGEST = "instance"
DYNSEC_FILE = "/mosquitto/data/dynamic-security.json"
BROKER_LIMITS = "\n".join(broker_limits())
LISTENER_LIMITS = "\n".join(listener_limits())
MOSQUITTO_CONF = f"""per_listener_settings false
allow_anonymous false
persistence true
persistence_location /mosquitto/data/
autosave_interval 60
{BROKER_LIMITS}
listener 1883
{LISTENER_LIMITS}
listener 9001
protocol websockets
{LISTENER_LIMITS}
plugin /usr/lib/mosquitto_dynamic_security.so
plugin_opt_config_file {DYNSEC_FILE}
"""
MQTT_WEBSOCKETS_PORT = 9001
# Tenants' Postgres and Mosquitto run as users above 10000, clear of any host's own users.
MOSQUITTO_UID = 11883
MQTT_ADMIN_DIR = "/etc/iotistic/mqtt-admin"
# postStart of the broker: the dynamic-security file keeps the admin's password of the first
# start. When the credentials were rotated, the Secret holds the new one and every earlier
# one (newest first, a line each): log in with the first that works and set the new, so the
# instance (which uses the new one to re-set its own ingest client's password at start) can
# administer the broker again. Every earlier one, not just the last: a rotation cut off after
# it recorded its generation, run again, skips a generation the broker never saw.
MQTT_POST_START_SH = f"""#!/bin/sh
# A hook's output is shown nowhere: write it to the container's log (its PID 1's stdout).
log="${{IOTISTIC_LOG_TO:-/proc/1/fd/1}}"
if [ -w "$log" ]; then exec >>"$log" 2>&1; fi
dir="${{IOTISTIC_MQTT_ADMIN:-{MQTT_ADMIN_DIR}}}"
port="${{IOTISTIC_MQTT_PORT:-1883}}"
user="$(cat "$dir/admin-username")"
password="$(cat "$dir/admin-password")"
earlier="$dir/admin-password-previous"
works() {{
  mosquitto_sub -h 127.0.0.1 -p "$port" -u "$user" -P "$1" -t '$SYS/broker/version' \\
    -C 1 -W 5 >/dev/null 2>&1
}}
move_from_earlier() {{
  [ -r "$earlier" ] || return 1
  while IFS= read -r previous || [ -n "$previous" ]; do
    if [ -n "$previous" ] && works "$previous"; then
      mosquitto_ctrl -h 127.0.0.1 -p "$port" -u "$user" -P "$previous" \\
        dynsec setClientPassword "$user" "$password" >/dev/null 2>&1 || true
      echo "iotistic: broker admin password rotated"
      return 0
    fi
  done < "$earlier"
  return 1
}}
i=0
while [ "$i" -lt 60 ]; do
  i=$((i + 1))
  if works "$password"; then exit 0; fi
  if move_from_earlier; then continue; fi
  sleep 1
done
echo "iotistic: no admin password of the Secret, current or earlier, works on the broker" >&2
"""
# The admin's files, as the broker's pod mounts them from the Secret ``mqtt``.
_ADMIN_KEYS = ("admin-username", "admin-password", "admin-password-previous")


def mosquitto_service(ns: str, cid: str) -> dict[str, Any]:
    """The Service ``mosquitto``: MQTT (1883) and MQTT over WebSockets (9001)."""
    return service(
        "mosquitto",
        ns,
        cid,
        [
            {"name": "mqtt", "port": 1883, "targetPort": 1883},
            {"name": "websockets", "port": 9001, "targetPort": 9001},
        ],
    )


def config_map(ns: str, cid: str) -> dict[str, Any]:
    """The ConfigMap ``mosquitto``: the broker's configuration and its postStart script."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta("mosquitto", ns, cid),
        "data": {"mosquitto.conf": MOSQUITTO_CONF, "post-start.sh": MQTT_POST_START_SH},
    }


def mosquitto(ns: str, cid: str, settings: KubernetesSettings, credentials: str) -> dict[str, Any]:
    """The StatefulSet ``mosquitto``; ``credentials``, the hash of the admin's password, rolls
    it when it is rotated."""
    # A new configuration (new limits) changes the pod template, so the broker rolls; so do
    # rotated credentials, whose postStart moves the admin to the new password.
    config_hash = hashlib.sha256((MOSQUITTO_CONF + MQTT_POST_START_SH).encode()).hexdigest()[:16]
    annotations = {"iotistic.io/config-sha256": config_hash, CREDENTIALS_HASH: credentials}
    admin_mount = {"name": "admin", "mountPath": MQTT_ADMIN_DIR, "readOnly": True}
    pod = {
        **NO_CLUSTER_ACCESS,
        # A user of its own, not the image's 1883 (a host's system range): the broker writes
        # only its data volume, which fsGroup gives it.
        "securityContext": pod_security(MOSQUITTO_UID),
        "initContainers": [_dynsec_init(settings, admin_mount)],
        "containers": [_broker(settings, admin_mount)],
        "volumes": [
            {"name": "config", "configMap": {"name": "mosquitto"}},
            {
                "name": "admin",
                "secret": {
                    "secretName": "mqtt",
                    "defaultMode": SECRET_FILE_MODE,
                    "items": [{"key": k, "path": k} for k in _ADMIN_KEYS],
                },
            },
        ],
    }
    return stateful_set("mosquitto", ns, cid, annotations, pod, claim_spec("1Gi", settings))


def _dynsec_init(settings: KubernetesSettings, admin_mount: dict[str, Any]) -> dict[str, Any]:
    """The first start makes the dynamic-security file with the admin."""
    return {
        "name": "dynsec-init",
        "image": settings.mosquitto_image,
        "imagePullPolicy": "IfNotPresent",
        "command": [
            "sh",
            "-c",
            f"[ -f {DYNSEC_FILE} ] || mosquitto_ctrl dynsec init {DYNSEC_FILE} "
            f'"$(cat {MQTT_ADMIN_DIR}/admin-username)" '
            f'"$(cat {MQTT_ADMIN_DIR}/admin-password)"',
        ],
        "resources": {
            "requests": {"cpu": "50m", "memory": "32Mi"},
            "limits": {"cpu": "200m", "memory": "64Mi"},
        },
        "securityContext": restricted(),
        "volumeMounts": [{"name": "data", "mountPath": "/mosquitto/data"}, admin_mount],
    }


def _broker(settings: KubernetesSettings, admin_mount: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "mosquitto",
        "image": settings.mosquitto_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["mosquitto", "-c", "/mosquitto/config/mosquitto.conf"],
        "ports": [
            {"name": "mqtt", "containerPort": 1883},
            {"name": "websockets", "containerPort": 9001},
        ],
        "lifecycle": {
            "postStart": {"exec": {"command": ["sh", "/mosquitto/config/post-start.sh"]}}
        },
        "readinessProbe": {"tcpSocket": {"port": 1883}, "periodSeconds": 5},
        # The listener accepts: cheap, and needs no credential (an admin password out of step
        # must not restart the broker under devices).
        "livenessProbe": {
            "tcpSocket": {"port": 1883},
            "periodSeconds": 20,
            "failureThreshold": 3,
        },
        "resources": {
            "requests": {"cpu": "100m", "memory": "64Mi"},
            "limits": {"cpu": "500m", "memory": "256Mi"},
        },
        "securityContext": restricted(),
        "volumeMounts": [
            {"name": "config", "mountPath": "/mosquitto/config"},
            {"name": "data", "mountPath": "/mosquitto/data"},
            admin_mount,
        ],
    }
