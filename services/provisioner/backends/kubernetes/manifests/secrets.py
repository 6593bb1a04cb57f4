"""The tenant's Secrets (license, database, Postgres superuser, broker, control plane,
monitoring), and the credentials they hold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.provisioner.backends.base import InstanceSpec
from services.provisioner.backends.kubernetes.manifests.metadata import (
    credentials_hash,
    object_meta,
)
from services.provisioner.backends.kubernetes.manifests.mosquitto import MQTT_ADMIN, MQTT_INGEST
from services.provisioner.backends.kubernetes.manifests.postgres_scripts import (
    PG_DATABASE,
    PG_INSTANCE_ROLE,
)


@dataclass(frozen=True)
class TenantCredentials:
    """What the tenant's Secrets hold (``render`` documents each)."""

    database: str
    postgres_superuser: str = ""
    mqtt_admin: str = ""
    mqtt_admin_previous: str = ""
    mqtt_ingest: str = ""
    mqtt_client_id: str = ""
    login_relay_key: str = ""
    monitoring_token: str = ""
    usage_token: str = ""

    def postgres_hash(self) -> str:
        """Of the passwords the Postgres pod sets (rolled when they change)."""
        return credentials_hash(self.database, self.postgres_superuser)

    def mosquitto_hash(self) -> str:
        """Of the broker's admin password."""
        return credentials_hash(self.mqtt_admin)

    def instance_hash(self) -> str:
        """Of everything the instance is given."""
        return credentials_hash(
            self.database,
            self.mqtt_admin,
            self.mqtt_ingest,
            self.mqtt_client_id,
            self.monitoring_token,
            self.login_relay_key,
            self.usage_token,
        )


def secrets(spec: InstanceSpec, ns: str, credentials: TenantCredentials) -> list[dict[str, Any]]:
    """Every Secret of the tenant, in apply order."""
    cid = spec.customer_id
    c = credentials
    db_url = f"postgresql://{PG_INSTANCE_ROLE}:{c.database}@postgres.{ns}.svc:5432/{PG_DATABASE}"
    return [
        _secret(
            ns, cid, "license", {"license.jwt": spec.license_jwt, "license-id": spec.license_id}
        ),
        _secret(
            ns,
            cid,
            "database",
            {
                "user": PG_INSTANCE_ROLE,
                "password": c.database,
                "database": PG_DATABASE,
                "url": db_url,
            },
        ),
        # The superuser's password: mounted by the Postgres pod only.
        _secret(ns, cid, "postgres", {"superuser-password": c.postgres_superuser}),
        _secret(
            ns,
            cid,
            "mqtt",
            {
                "admin-username": MQTT_ADMIN,
                "admin-password": c.mqtt_admin,
                "username": MQTT_INGEST,
                "password": c.mqtt_ingest,
                "client-id": c.mqtt_client_id,
                # Mounted by the broker only: the admin's earlier passwords, newest first.
                "admin-password-previous": c.mqtt_admin_previous,
            },
        ),
        # The key the dashboard signs browsers' addresses with when it relays a sign-in, and
        # the token the instance reports its usage to billing with.
        _secret(
            ns,
            cid,
            "control-plane",
            {"login-relay-key": c.login_relay_key, "usage-token": c.usage_token},
        ),
        _secret(ns, cid, "monitoring", {"token": c.monitoring_token}),
    ]


def _secret(ns: str, cid: str, name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": object_meta(name, ns, cid),
        "type": "Opaque",
        "stringData": data,
    }
