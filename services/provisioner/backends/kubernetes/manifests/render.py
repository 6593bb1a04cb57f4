"""Every object of a customer's instance, in the order they apply (``render``), and the set
written as YAML (``render_yaml``)."""

from __future__ import annotations

from typing import Any

import yaml

from services.provisioner.backends.base import InstanceSpec
from services.provisioner.backends.kubernetes import backups
from services.provisioner.backends.kubernetes.manifests import mosquitto, postgres
from services.provisioner.backends.kubernetes.manifests.gateway import http_route
from services.provisioner.backends.kubernetes.manifests.instance import (
    instance,
    instance_service,
)
from services.provisioner.backends.kubernetes.manifests.metadata import (
    check_customer_id,
    namespace_of,
    object_meta,
)
from services.provisioner.backends.kubernetes.manifests.namespace import (
    limits,
    quota,
    reader_binding,
    tenant_namespace,
)
from services.provisioner.backends.kubernetes.manifests.network import (
    gateway_ingress,
    instance_egress,
    isolation_policy,
)
from services.provisioner.backends.kubernetes.manifests.secrets import TenantCredentials, secrets
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings
from services.provisioner.backends.kubernetes.storage import (
    BACKUP_CLAIM,
    DATA_CLAIM,
    TenantStorage,
    tenant_storage,
    volume_claims,
)


def render(
    spec: InstanceSpec,
    settings: KubernetesSettings,
    db_password: str,
    mqtt_admin_password: str = "",
    mqtt_password: str = "",
    login_relay_key: str = "",
    mqtt_client_id: str = "",
    monitoring_token: str = "",
    usage_token: str = "",
    postgres_password: str = "",
    mqtt_admin_password_previous: str = "",
    credentials_generation: int = 0,
    secret_fingerprint: str = "",
) -> list[dict[str, Any]]:
    """Every object of the customer's instance, in apply order.

    The broker keeps its clients (dynamic security) on a volume of its own; its admin, which
    the instance uses to give devices their credentials, and the instance's own ingest client
    have the passwords given here, and the ingest client is bound to ``mqtt_client_id``.
    ``monitoring_token`` opens the instance's metrics and readiness detail; ``usage_token`` is
    the instance's credential for its usage reports to billing.

    ``db_password`` is the instance's own database role's, ``postgres_password`` the
    superuser's, which only the Postgres pod sees. ``credentials_generation`` is recorded on
    the Namespace, where the backend reads it back before the next apply; after a rotation
    ``mqtt_admin_password_previous`` (the earlier ones, a line each, newest first) lets the
    broker move its admin to the new password."""
    credentials = TenantCredentials(
        database=db_password,
        postgres_superuser=postgres_password,
        mqtt_admin=mqtt_admin_password,
        mqtt_admin_previous=mqtt_admin_password_previous,
        mqtt_ingest=mqtt_password,
        mqtt_client_id=mqtt_client_id,
        login_relay_key=login_relay_key,
        monitoring_token=monitoring_token,
        usage_token=usage_token,
    )
    cid = spec.customer_id
    check_customer_id(cid)
    ns = namespace_of(cid, settings)
    reads = reader_binding(ns, cid, settings)
    return [
        tenant_namespace(ns, cid, credentials_generation, secret_fingerprint),
        # Right after the namespace: before anything the backend reads back.
        *([reads] if reads is not None else []),
        *_workloads(spec, ns, settings, credentials),
    ]


def _workloads(
    spec: InstanceSpec, ns: str, settings: KubernetesSettings, credentials: TenantCredentials
) -> list[dict[str, Any]]:
    """Everything in the namespace: its bounds and policies, Secrets and configuration, then
    the volumes and workloads, and the route last."""
    cid = spec.customer_id
    storage = tenant_storage(spec.plan, spec.license_jwt, settings.storage)
    return [
        quota(ns, cid, storage),
        limits(ns, cid),
        isolation_policy(ns, cid, settings),
        *gateway_ingress(ns, cid, settings),
        instance_egress(ns, cid, settings),
        *secrets(spec, ns, credentials),
        mosquitto.config_map(ns, cid),
        postgres.scripts_config_map(ns, cid),
        backups.config_map(object_meta(backups.CONFIG_MAP, ns, cid)),
        # Before the StatefulSet, which then adopts the data claim at the plan's size.
        *_volume_claims(ns, cid, storage, settings),
        postgres.postgres_service(ns, cid),
        postgres.postgres(ns, cid, settings, credentials.postgres_hash()),
        backups.cronjob(
            object_meta(backups.CRONJOB, ns, cid),
            cid,
            settings.postgres_image,
            storage.backups_kept,
            settings.backup_schedule,
        ),
        mosquitto.mosquitto_service(ns, cid),
        mosquitto.mosquitto(ns, cid, settings, credentials.mosquitto_hash()),
        instance_service(ns, cid),
        instance(spec, ns, settings, credentials.instance_hash()),
        *http_route(spec, ns, settings),
    ]


def _volume_claims(
    ns: str, cid: str, storage: TenantStorage, settings: KubernetesSettings
) -> list[dict[str, Any]]:
    return volume_claims(
        object_meta(DATA_CLAIM, ns, cid, labels={"app.kubernetes.io/name": "postgres"}),
        object_meta(BACKUP_CLAIM, ns, cid, labels={"app.kubernetes.io/name": "tenant-backup"}),
        storage,
        settings.storage_class,
    )


class _NoAliases(yaml.SafeDumper):
    # Every object written out in full: no "&id001"/"*id001" for a dict used twice.
    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_yaml(objects: list[dict[str, Any]]) -> str:
    """The objects as one multi-document YAML stream."""
    return str(yaml.dump_all(objects, Dumper=_NoAliases, sort_keys=False, default_flow_style=False))
