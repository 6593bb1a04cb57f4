"""The customer's instance: a Deployment of one pod (``iotistic run --target instance``), its
Service, and what it is told in its environment."""

from __future__ import annotations

from typing import Any

from services.provisioner.backends.base import InstanceSpec
from services.provisioner.backends.kubernetes.manifests.gateway import mqtt_public_url
from services.provisioner.backends.kubernetes.manifests.metadata import (
    CREDENTIALS_HASH,
    object_meta,
)
from services.provisioner.backends.kubernetes.manifests.pods import (
    NO_CLUSTER_ACCESS,
    pod_security,
    restricted,
    secret_env,
    service,
)
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings
from services.provisioner.backends.kubernetes.trace import trace_env

INSTANCE_PORT = 8080
INSTANCE_UID = 10001


def instance_service(ns: str, cid: str) -> dict[str, Any]:
    """The Service ``instance``: port 80 to the pod's HTTP port."""
    return service("instance", ns, cid, [{"name": "http", "port": 80, "targetPort": "http"}])


def instance(
    spec: InstanceSpec, ns: str, settings: KubernetesSettings, credentials: str = ""
) -> dict[str, Any]:
    """The Deployment ``instance``; its pod template changes (and the Deployment rolls) with
    the license, a restart key and ``credentials``, the hash of the credentials it is given."""
    labels = {"app.kubernetes.io/name": "instance"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta("instance", ns, spec.customer_id, labels=dict(labels)),
        "spec": {
            "replicas": 1,
            # One pod at a time: two would share the ingest client's MQTT client id, and the
            # broker would throw each out for the other. A rollout has a short gap instead.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": labels,
                    # A new license changes the template, so the Deployment rolls; so does a
                    # redeploy that must replace the running pods (kubectl's rollout restart),
                    # and rotated credentials.
                    "annotations": {
                        "iotistic.io/license-id": spec.license_id,
                        **({"iotistic.io/restart": spec.restart_key} if spec.restart_key else {}),
                        CREDENTIALS_HASH: credentials,
                    },
                },
                "spec": {
                    **NO_CLUSTER_ACCESS,
                    "securityContext": pod_security(INSTANCE_UID),
                    "containers": [_container(spec, settings)],
                    "volumes": [
                        {"name": "license", "secret": {"secretName": "license"}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def _container(spec: InstanceSpec, settings: KubernetesSettings) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/health/ready", "port": "http"}, "periodSeconds": 5}
    return {
        "name": "instance",
        "image": settings.instance_image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["run", "--target", "instance"],
        "ports": [{"name": "http", "containerPort": INSTANCE_PORT}],
        "env": [
            *_platform_env(spec, settings),
            *_control_plane_env(settings),
            *_telemetry_env(settings),
        ],
        "readinessProbe": probe,
        "livenessProbe": {
            "httpGet": {"path": "/health/live", "port": "http"},
            "periodSeconds": 10,
        },
        "resources": {
            "requests": {"cpu": "250m", "memory": "256Mi"},
            "limits": {"cpu": "1", "memory": "1Gi"},
        },
        "securityContext": restricted(),
        "volumeMounts": [
            {"name": "license", "mountPath": "/etc/iotistic/license", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108
        ],
    }


def _platform_env(spec: InstanceSpec, settings: KubernetesSettings) -> list[dict[str, Any]]:
    """Who the instance is, its license, database and broker (the passwords from Secrets)."""
    return [
        {"name": "INSTANCE_CUSTOMER_ID", "value": spec.customer_id},
        secret_env("DATABASE_URL", "database", "url"),
        {"name": "LICENSE_FILE", "value": "/etc/iotistic/license/license.jwt"},
        {"name": "LICENSE_JWKS_URL", "value": spec.jwks_url},
        {"name": "HTTP_HOST", "value": "0.0.0.0"},  # noqa: S104
        {"name": "HTTP_PORT", "value": str(INSTANCE_PORT)},
        {"name": "MQTT_HOST", "value": "mosquitto"},
        {"name": "MQTT_PORT", "value": "1883"},
        {"name": "MQTT_PUBLIC_URLS", "value": mqtt_public_url(spec.customer_id, settings)},
        secret_env("MQTT_USERNAME", "mqtt", "username"),
        secret_env("MQTT_PASSWORD", "mqtt", "password"),
        # Optional: a Secret of an older version lacks them (the id then derives from the
        # password; /metrics needs a session).
        secret_env("MQTT_CLIENT_ID", "mqtt", "client-id", optional=True),
        secret_env("MONITORING_TOKEN", "monitoring", "token", optional=True),
        {"name": "ALERT_WEBHOOK_ALLOWED_CIDRS", "value": settings.alert_webhook_allowed_cidrs},
        secret_env("MQTT_ADMIN_USERNAME", "mqtt", "admin-username"),
        secret_env("MQTT_ADMIN_PASSWORD", "mqtt", "admin-password"),
    ]


def _telemetry_env(settings: KubernetesSettings) -> list[dict[str, Any]]:
    """Where its spans go, and the trace a job hands it (``trace``: not in the template)."""
    endpoint = (
        [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": settings.otlp_endpoint}]
        if settings.otlp_endpoint
        else []
    )
    return [{"name": "OTEL_EXPORTER", "value": settings.otel_exporter}, *endpoint, *trace_env()]


def _control_plane_env(settings: KubernetesSettings) -> list[dict[str, Any]]:
    """How the instance reaches the control plane, and the proxy in front of it."""
    return [
        secret_env("LOGIN_RELAY_KEY", "control-plane", "login-relay-key"),
        # Each owner directly, through its own Service: signup checks sign-ins and sessions,
        # billing takes the usage reports. (LOG_LEVEL stays the instance's INFO: the kubelet
        # rotates a container's log, unlike the local backend's log files.)
        {"name": "CONTROL_PLANE_URL", "value": settings.control_plane_url},
        {"name": "USAGE_URL", "value": settings.usage_url or settings.control_plane_url},
        secret_env("USAGE_TOKEN", "control-plane", "usage-token"),
        {"name": "USAGE_REPORT_SECONDS", "value": str(settings.usage_report_seconds)},
        # Browsers come through the ingress controller, which sets X-Forwarded-For to the
        # address it saw.
        {"name": "TRUSTED_PROXY_HOPS", "value": "1"},
    ]
