"""The customer's credentials on Kubernetes: derived from ``PROVISIONER_SECRET`` (HMAC) and the
customer's credentials generation, recorded on their Namespace, so re-applying never changes
them and nothing secret is stored; and the checks that a Namespace is the customer's."""

from __future__ import annotations

from typing import Any

from contracts.credentials import instance_usage_token, login_relay_key
from services.provisioner.backends.base import BackendError, InstanceSpec, derive_password
from services.provisioner.backends.kubernetes.manifests.metadata import CREDENTIALS_GENERATION
from services.provisioner.backends.kubernetes.manifests.namespace import namespace_owner_conflict
from services.provisioner.backends.kubernetes.manifests.render import render
from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings


def customer_objects(
    spec: InstanceSpec,
    settings: KubernetesSettings,
    secret: bytes,
    login_relay_secret: str | None = None,
    usage_secret: str | None = None,
    credentials_generation: int = 0,
) -> list[dict[str, Any]]:
    """``render`` with the customer's passwords, broker client id and monitoring token, all
    derived from ``PROVISIONER_SECRET`` and the customer's credentials generation (the login
    relay key from ``LOGIN_RELAY_SECRET``, the usage token from billing's ``USAGE_SECRET``, as
    the local backend derives them): re-applying never changes them, nothing is stored. A
    rotation (the next generation) changes every password and the monitoring token; not the
    broker client id, which names the instance's session (its queued readings)."""
    cid = spec.customer_id
    generation = credentials_generation

    def password(purpose: str) -> str:
        return derive_password(secret, purpose, cid, generation)

    # Every earlier generation's admin password, newest first: the broker may have missed some
    # (a rotation cut off after it recorded its generation, then run again).
    previous_admin = "\n".join(
        derive_password(secret, "mqtt-admin", cid, earlier)
        for earlier in range(generation - 1, -1, -1)
    )
    return render(
        spec,
        settings,
        password("database"),
        mqtt_admin_password=password("mqtt-admin"),
        mqtt_password=password("mqtt"),
        mqtt_client_id=f"instance-{derive_password(secret, 'mqtt-client-id', cid)[:32]}",
        monitoring_token=password("monitoring"),
        login_relay_key=login_relay_key(login_relay_secret, cid) if login_relay_secret else "",
        usage_token=instance_usage_token(usage_secret, cid) if usage_secret else "",
        postgres_password=password("postgres-superuser"),
        mqtt_admin_password_previous=previous_admin,
        credentials_generation=generation,
        secret_fingerprint=secret_fingerprint(secret, cid),
    )


def secret_fingerprint(secret: bytes, customer_id: str) -> str:
    """The customer's fingerprint of ``PROVISIONER_SECRET``, recorded on their Namespace."""
    return derive_password(secret, "secret-fingerprint", customer_id)[:16]


def owned(namespace: dict[str, Any] | None, customer_id: str) -> dict[str, Any] | None:
    """``namespace`` when it is ``customer_id``'s (or records nobody); ``BackendError`` when
    it is another customer's, whose objects an apply would replace."""
    conflict = namespace_owner_conflict(namespace, customer_id)
    if conflict is not None:
        raise BackendError(conflict)
    return namespace


def credentials_generation_of(namespace: dict[str, Any] | None) -> int:
    """The customer's credentials generation, as recorded on their Namespace (0 when it is
    not there yet, or was made by a version before rotation). A value that is not a count is
    an error, never 0: applying generation 0 would undo a rotation."""
    if namespace is None:
        return 0
    annotations = (namespace.get("metadata") or {}).get("annotations") or {}
    text = annotations.get(CREDENTIALS_GENERATION)
    if text is None:
        return 0
    if not str(text).isdigit():
        name = (namespace.get("metadata") or {}).get("name", "?")
        raise BackendError(f"namespace {name}: {CREDENTIALS_GENERATION} is not a count")
    return int(text)
