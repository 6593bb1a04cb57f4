"""The Kubernetes objects of one customer's instance, as plain dicts, in the order they apply.

Namespace ``customer-<id>`` with a ResourceQuota (4 CPU / 4Gi) and LimitRange; a NetworkPolicy
that isolates it (in: its own pods, and the ingress controller to the instance and to the
broker's WebSockets; out: its own pods and DNS) and one that lets the instance pods out to the
control plane's HTTP port (its pods only, for the JWKS, sign-ins and usage) and to the public
internet (alert webhooks), but not to private, loopback or link-local addresses nor the
cluster's own networks; Secrets for the license, the database, the broker and monitoring;
Postgres as a StatefulSet whose data volume is sized by the plan (``k8s_storage``), a
"backups" volume and the daily backup CronJob with its scripts (``k8s_backups``); Mosquitto
on 1883 and 9001, with the platform's message size and queue limits; the instance Deployment
and Service; an Ingress at
``<id>.<BASE_DOMAIN>`` with TLS by cert-manager, which also carries MQTT over WebSockets at
``wss://<id>.<BASE_DOMAIN>/mqtt`` to the broker: the way devices outside the cluster reach it.
``render`` is pure: the same customer, license and password give the same objects, so applying
them again (a retried job, an update) converges. A new license changes the instance pod
template's annotation, which rolls the Deployment.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from libs.mqtt_broker import broker_limits, listener_limits
from services.provisioner.backends import k8s_backups
from services.provisioner.backends.base import InstanceSpec
from services.provisioner.backends.k8s_storage import (
    BACKUP_CLAIM,
    DATA_CLAIM,
    StoragePolicy,
    TenantStorage,
    tenant_storage,
    volume_claims,
)

PART_OF = "iotistic"
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
INSTANCE_PORT = 8080
MQTT_PATH = "/mqtt"
# What instances may not reach outside their namespace, although it is not the control plane:
# every private, loopback, link-local, shared, multicast and reserved range (and IPv4 in IPv6).
NOT_PUBLIC_V4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
NOT_PUBLIC_V6 = ("::1/128", "::ffff:0:0/96", "fc00::/7", "fe80::/10", "ff00::/8")
RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


@dataclass(frozen=True)
class KubernetesSettings:
    """Cluster-specific choices for the rendered objects."""

    base_domain: str = "iotistic.cloud"
    instance_image: str = "ghcr.io/iotistic/iotistic:0.1.0"
    postgres_image: str = "postgres:18"
    mosquitto_image: str = "eclipse-mosquitto:2.0"
    cluster_issuer: str = "letsencrypt-prod"
    ingress_class: str = "nginx"
    ingress_namespace: str = "ingress-nginx"
    control_plane_namespace: str = "iotistic"
    # The control plane's HTTP pods (the chart's) and their port: all of it instances reach.
    control_plane_pod_labels: dict[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "iotistic"}
    )
    control_plane_port: int = 8080
    # The cluster's pod and service networks, refused like the private ranges.
    cluster_cidrs: tuple[str, ...] = ()
    # Handed to instances: networks their webhooks may reach although not public.
    alert_webhook_allowed_cidrs: str = ""
    storage_class: str | None = None
    namespace_prefix: str = "customer-"
    # Volumes sized by plan, and how many daily dumps each plan keeps (k8s_storage).
    storage: StoragePolicy = field(default_factory=StoragePolicy)
    # The backup CronJob's schedule; unset: a minute between 01:00 and 05:00 UTC by customer.
    backup_schedule: str | None = None
    # Days a deleted customer's namespace, volumes and backups are kept before the purge.
    deletion_grace_days: int = 30


def dns_label(customer_id: str) -> str:
    """The customer id as a DNS-1123 label (lower case, a-z0-9 and '-', at most 63)."""
    label = re.sub(r"[^a-z0-9-]", "-", customer_id.lower()).strip("-")
    return label[:63].rstrip("-") or "customer"


def namespace_of(customer_id: str, settings: KubernetesSettings) -> str:
    """``customer-<id>``."""
    return dns_label(f"{settings.namespace_prefix}{dns_label(customer_id)}")


def host_of(customer_id: str, settings: KubernetesSettings) -> str:
    """``<id>.<base domain>``, where the customer's instance answers."""
    return f"{dns_label(customer_id)}.{settings.base_domain}"


def _meta(name: str, namespace: str | None, customer_id: str, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "labels": {
            "app.kubernetes.io/part-of": PART_OF,
            "app.kubernetes.io/managed-by": "iotistic-provisioner",
            "iotistic.io/customer-id": dns_label(customer_id),
            **extra.pop("labels", {}),
        },
        **extra,
    }
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


def render(
    spec: InstanceSpec,
    settings: KubernetesSettings,
    db_password: str,
    mqtt_admin_password: str = "",
    mqtt_password: str = "",
    login_relay_key: str = "",
    mqtt_client_id: str = "",
    monitoring_token: str = "",
) -> list[dict[str, Any]]:
    """Every object of the customer's instance, in apply order.

    The broker keeps its clients (dynamic security) on a volume of its own; its admin, which
    the instance uses to give devices their credentials, and the instance's own ingest client
    have the passwords given here, and the ingest client is bound to ``mqtt_client_id``.
    ``monitoring_token`` opens the instance's metrics and readiness detail."""
    cid = spec.customer_id
    ns = namespace_of(cid, settings)
    database = "iotistic"
    db_url = f"postgresql://iotistic:{db_password}@postgres.{ns}.svc:5432/{database}"
    storage = tenant_storage(spec.plan, spec.license_jwt, settings.storage)
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(ns, None, cid)},
        _quota(ns, cid, storage),
        _limits(ns, cid),
        _network_policy(ns, cid, settings),
        _instance_egress(ns, cid, settings),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta("license", ns, cid),
            "type": "Opaque",
            "stringData": {"license.jwt": spec.license_jwt, "license-id": spec.license_id},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta("database", ns, cid),
            "type": "Opaque",
            "stringData": {
                "user": "iotistic",
                "password": db_password,
                "database": database,
                "url": db_url,
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta("mqtt", ns, cid),
            "type": "Opaque",
            "stringData": {
                "admin-username": MQTT_ADMIN,
                "admin-password": mqtt_admin_password,
                "username": MQTT_INGEST,
                "password": mqtt_password,
                "client-id": mqtt_client_id,
            },
        },
        {
            # The key the dashboard signs browsers' addresses with when it relays a sign-in.
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta("control-plane", ns, cid),
            "type": "Opaque",
            "stringData": {"login-relay-key": login_relay_key},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta("monitoring", ns, cid),
            "type": "Opaque",
            "stringData": {"token": monitoring_token},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta("mosquitto", ns, cid),
            "data": {"mosquitto.conf": MOSQUITTO_CONF},
        },
        k8s_backups.config_map(_meta(k8s_backups.CONFIG_MAP, ns, cid)),
        # Before the StatefulSet, which then adopts the data claim at the plan's size.
        *_volume_claims(ns, cid, storage, settings),
        _postgres_service(ns, cid),
        _postgres(ns, cid, settings),
        k8s_backups.cronjob(
            _meta(k8s_backups.CRONJOB, ns, cid),
            cid,
            settings.postgres_image,
            storage.backups_kept,
            settings.backup_schedule,
        ),
        _mosquitto_service(ns, cid),
        _mosquitto(ns, cid, settings),
        _instance_service(ns, cid),
        _instance(spec, ns, settings),
        _ingress(ns, cid, settings),
    ]


def _volume_claims(
    ns: str, cid: str, storage: TenantStorage, settings: KubernetesSettings
) -> list[dict[str, Any]]:
    return volume_claims(
        _meta(DATA_CLAIM, ns, cid, labels={"app.kubernetes.io/name": "postgres"}),
        _meta(BACKUP_CLAIM, ns, cid, labels={"app.kubernetes.io/name": "tenant-backup"}),
        storage,
        settings.storage_class,
    )


def _quota(ns: str, cid: str, storage: TenantStorage) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": _meta("customer-quota", ns, cid),
        "spec": {
            "hard": {
                "requests.cpu": "4",
                "requests.memory": "4Gi",
                "limits.cpu": "4",
                "limits.memory": "4Gi",
                "persistentvolumeclaims": "4",
                # The data, backups and broker volumes (k8s_storage.keep_grown raises it
                # where a volume is bigger than its plan's size).
                "requests.storage": f"{storage.total_gib}Gi",
            }
        },
    }


def _limits(ns: str, cid: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "LimitRange",
        "metadata": _meta("container-defaults", ns, cid),
        "spec": {
            "limits": [
                {
                    "type": "Container",
                    "default": {"cpu": "500m", "memory": "512Mi"},
                    "defaultRequest": {"cpu": "100m", "memory": "128Mi"},
                    "max": {"cpu": "2", "memory": "2Gi"},
                }
            ]
        },
    }


def _network_policy(ns: str, cid: str, settings: KubernetesSettings) -> dict[str, Any]:
    same_namespace: dict[str, Any] = {"podSelector": {}}

    def namespace(name: str) -> dict[str, Any]:
        return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}

    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta("isolate-customer", ns, cid),
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"from": [same_namespace]},
                {
                    # The ingress controller, to the instance and (devices' MQTT over
                    # WebSockets, TLS ended at the ingress) to the broker.
                    "from": [namespace(settings.ingress_namespace)],
                    "ports": [
                        {"protocol": "TCP", "port": INSTANCE_PORT},
                        {"protocol": "TCP", "port": 9001},
                    ],
                },
            ],
            "egress": [
                {"to": [same_namespace]},
                {
                    "to": [namespace("kube-system")],
                    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
                },
            ],
        },
    }


def _instance_egress(ns: str, cid: str, settings: KubernetesSettings) -> dict[str, Any]:
    """The instance pods, besides their namespace and DNS: the control plane's HTTP pods on
    their port only (never its NATS or Postgres), and public addresses (alert webhooks)."""
    control_plane = {
        "namespaceSelector": {
            "matchLabels": {"kubernetes.io/metadata.name": settings.control_plane_namespace}
        },
        "podSelector": {"matchLabels": dict(settings.control_plane_pod_labels)},
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta("instance-egress", ns, cid),
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "instance"}},
            "policyTypes": ["Egress"],
            "egress": [
                {
                    "to": [control_plane],
                    "ports": [{"protocol": "TCP", "port": settings.control_plane_port}],
                },
                {"to": public_internet(settings.cluster_cidrs)},
            ],
        },
    }


def public_internet(cluster_cidrs: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """``ipBlock`` peers for every public address: all of IPv4 and IPv6 except the ranges that
    are not public and the cluster's own networks (as far as a NetworkPolicy can say it: pod
    addresses are matched by ipBlock only where the network plugin does so)."""
    blocks = []
    for everything, refused in (("0.0.0.0/0", NOT_PUBLIC_V4), ("::/0", NOT_PUBLIC_V6)):
        version = ipaddress.ip_network(everything).version
        excepted = [ipaddress.ip_network(c) for c in refused]
        for cidr in cluster_cidrs:
            network = ipaddress.ip_network(cidr, strict=False)
            if network.version == version and not any(
                network.subnet_of(e)  # type: ignore[arg-type]
                for e in excepted
                if e.version == version
            ):
                excepted.append(network)
        blocks.append({"ipBlock": {"cidr": everything, "except": [str(e) for e in excepted]}})
    return blocks


def _service(
    name: str, ns: str, cid: str, ports: list[dict[str, Any]], headless: bool = False
) -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": {"app.kubernetes.io/name": name}, "ports": ports}
    if headless:
        spec["clusterIP"] = "None"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, ns, cid, labels={"app.kubernetes.io/name": name}),
        "spec": spec,
    }


def _postgres_service(ns: str, cid: str) -> dict[str, Any]:
    return _service(
        "postgres", ns, cid, [{"name": "postgres", "port": 5432, "targetPort": 5432}], True
    )


def _mosquitto_service(ns: str, cid: str) -> dict[str, Any]:
    return _service(
        "mosquitto",
        ns,
        cid,
        [
            {"name": "mqtt", "port": 1883, "targetPort": 1883},
            {"name": "websockets", "port": 9001, "targetPort": 9001},
        ],
    )


def _instance_service(ns: str, cid: str) -> dict[str, Any]:
    return _service("instance", ns, cid, [{"name": "http", "port": 80, "targetPort": "http"}])


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _postgres(ns: str, cid: str, settings: KubernetesSettings) -> dict[str, Any]:
    claim = _claim("10Gi", settings)
    labels = {"app.kubernetes.io/name": "postgres"}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta("postgres", ns, cid, labels=dict(labels)),
        "spec": {
            "serviceName": "postgres",
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 999, "fsGroup": 999},
                    "containers": [
                        {
                            "name": "postgres",
                            "image": settings.postgres_image,
                            "ports": [{"name": "postgres", "containerPort": 5432}],
                            "env": [
                                _secret_env("POSTGRES_USER", "database", "user"),
                                _secret_env("POSTGRES_PASSWORD", "database", "password"),
                                _secret_env("POSTGRES_DB", "database", "database"),
                                {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"},
                            ],
                            "readinessProbe": {
                                "exec": {"command": ["pg_isready", "-U", "iotistic"]},
                                "periodSeconds": 5,
                            },
                            "resources": {
                                "requests": {"cpu": "250m", "memory": "512Mi"},
                                "limits": {"cpu": "1", "memory": "1Gi"},
                            },
                            "securityContext": RESTRICTED,
                            "volumeMounts": [
                                {"name": "data", "mountPath": "/var/lib/postgresql/data"}
                            ],
                        }
                    ],
                },
            },
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": claim}],
        },
    }


def _mosquitto(ns: str, cid: str, settings: KubernetesSettings) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "mosquitto"}
    # A new configuration (new limits) changes the pod template, so the broker rolls.
    config_hash = hashlib.sha256(MOSQUITTO_CONF.encode()).hexdigest()[:16]
    admin_env = [
        _secret_env("ADMIN_USER", "mqtt", "admin-username"),
        _secret_env("ADMIN_PASSWORD", "mqtt", "admin-password"),
    ]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta("mosquitto", ns, cid, labels=dict(labels)),
        "spec": {
            "serviceName": "mosquitto",
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {"iotistic.io/config-sha256": config_hash},
                },
                "spec": {
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1883, "fsGroup": 1883},
                    "initContainers": [
                        {
                            # The first start makes the dynamic-security file with the admin.
                            "name": "dynsec-init",
                            "image": settings.mosquitto_image,
                            "command": [
                                "sh",
                                "-c",
                                f"[ -f {DYNSEC_FILE} ] || mosquitto_ctrl dynsec init {DYNSEC_FILE} "
                                '"$ADMIN_USER" "$ADMIN_PASSWORD"',
                            ],
                            "env": admin_env,
                            "securityContext": RESTRICTED,
                            "volumeMounts": [{"name": "data", "mountPath": "/mosquitto/data"}],
                        }
                    ],
                    "containers": [
                        {
                            "name": "mosquitto",
                            "image": settings.mosquitto_image,
                            "command": ["mosquitto", "-c", "/mosquitto/config/mosquitto.conf"],
                            "ports": [
                                {"name": "mqtt", "containerPort": 1883},
                                {"name": "websockets", "containerPort": 9001},
                            ],
                            "readinessProbe": {"tcpSocket": {"port": 1883}, "periodSeconds": 5},
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "64Mi"},
                                "limits": {"cpu": "500m", "memory": "256Mi"},
                            },
                            "securityContext": RESTRICTED,
                            "volumeMounts": [
                                {"name": "config", "mountPath": "/mosquitto/config"},
                                {"name": "data", "mountPath": "/mosquitto/data"},
                            ],
                        }
                    ],
                    "volumes": [{"name": "config", "configMap": {"name": "mosquitto"}}],
                },
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "data"},
                    "spec": _claim("1Gi", settings),
                }
            ],
        },
    }


def _claim(size: str, settings: KubernetesSettings) -> dict[str, Any]:
    claim: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": size}},
    }
    if settings.storage_class:
        claim["storageClassName"] = settings.storage_class
    return claim


def _instance(spec: InstanceSpec, ns: str, settings: KubernetesSettings) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "instance"}
    probe = {"httpGet": {"path": "/health/ready", "port": "http"}, "periodSeconds": 5}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta("instance", ns, spec.customer_id, labels=dict(labels)),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": labels,
                    # A new license changes the template, so the Deployment rolls; so does a
                    # redeploy that must replace the running pods (kubectl's rollout restart).
                    "annotations": {
                        "iotistic.io/license-id": spec.license_id,
                        **({"iotistic.io/restart": spec.restart_key} if spec.restart_key else {}),
                    },
                },
                "spec": {
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
                    "containers": [
                        {
                            "name": "instance",
                            "image": settings.instance_image,
                            "args": ["run", "--target", "instance"],
                            "ports": [{"name": "http", "containerPort": INSTANCE_PORT}],
                            "env": [
                                {"name": "INSTANCE_CUSTOMER_ID", "value": spec.customer_id},
                                _secret_env("DATABASE_URL", "database", "url"),
                                {
                                    "name": "LICENSE_FILE",
                                    "value": "/etc/iotistic/license/license.jwt",
                                },
                                {"name": "LICENSE_JWKS_URL", "value": spec.jwks_url},
                                {"name": "HTTP_HOST", "value": "0.0.0.0"},  # noqa: S104
                                {"name": "HTTP_PORT", "value": str(INSTANCE_PORT)},
                                {"name": "MQTT_HOST", "value": "mosquitto"},
                                {"name": "MQTT_PORT", "value": "1883"},
                                {
                                    "name": "MQTT_PUBLIC_URLS",
                                    "value": mqtt_public_url(spec.customer_id, settings),
                                },
                                _secret_env("MQTT_USERNAME", "mqtt", "username"),
                                _secret_env("MQTT_PASSWORD", "mqtt", "password"),
                                # Optional: a Secret of an older version lacks them (the
                                # id then derives from the password; /metrics needs a session).
                                _secret_env("MQTT_CLIENT_ID", "mqtt", "client-id", optional=True),
                                _secret_env(
                                    "MONITORING_TOKEN", "monitoring", "token", optional=True
                                ),
                                {
                                    "name": "ALERT_WEBHOOK_ALLOWED_CIDRS",
                                    "value": settings.alert_webhook_allowed_cidrs,
                                },
                                _secret_env("MQTT_ADMIN_USERNAME", "mqtt", "admin-username"),
                                _secret_env("MQTT_ADMIN_PASSWORD", "mqtt", "admin-password"),
                                _secret_env("LOGIN_RELAY_KEY", "control-plane", "login-relay-key"),
                                # Browsers come through the ingress controller, which sets
                                # X-Forwarded-For to the address it saw.
                                {"name": "TRUSTED_PROXY_HOPS", "value": "1"},
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
                            "securityContext": {**RESTRICTED, "readOnlyRootFilesystem": True},
                            "volumeMounts": [
                                {
                                    "name": "license",
                                    "mountPath": "/etc/iotistic/license",
                                    "readOnly": True,
                                },
                                {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "license", "secret": {"secretName": "license"}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def mqtt_public_url(customer_id: str, settings: KubernetesSettings) -> str:
    """Where the customer's devices connect: MQTT over WebSockets through the Ingress."""
    return f"wss://{host_of(customer_id, settings)}{MQTT_PATH}"


def _ingress(ns: str, cid: str, settings: KubernetesSettings) -> dict[str, Any]:
    host = host_of(cid, settings)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": _meta(
            "instance",
            ns,
            cid,
            annotations={
                "cert-manager.io/cluster-issuer": settings.cluster_issuer,
                # Devices keep their MQTT connection open, browsers their live stream.
                "nginx.ingress.kubernetes.io/proxy-read-timeout": "3600",
                "nginx.ingress.kubernetes.io/proxy-send-timeout": "3600",
            },
        ),
        "spec": {
            "ingressClassName": settings.ingress_class,
            "tls": [{"hosts": [host], "secretName": "instance-tls"}],
            "rules": [
                {
                    "host": host,
                    "http": {
                        "paths": [
                            {
                                "path": MQTT_PATH,
                                "pathType": "Exact",
                                "backend": {
                                    "service": {
                                        "name": "mosquitto",
                                        "port": {"name": "websockets"},
                                    }
                                },
                            },
                            {
                                "path": "/",
                                "pathType": "Prefix",
                                "backend": {
                                    "service": {"name": "instance", "port": {"name": "http"}}
                                },
                            },
                        ]
                    },
                }
            ],
        },
    }


def render_yaml(objects: list[dict[str, Any]]) -> str:
    """The objects as one multi-document YAML stream."""
    return str(yaml.safe_dump_all(objects, sort_keys=False, default_flow_style=False))
