"""What every object of a tenant carries: its names (namespace, host), its labels, and the
annotations the backend reads back."""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any

from services.provisioner.backends.base import BackendError

if TYPE_CHECKING:
    from services.provisioner.backends.kubernetes.manifests.settings import KubernetesSettings

PART_OF = "iotistic"
CREDENTIALS_GENERATION = "iotistic.io/credentials-generation"
# The customer a namespace was made for, as their id is (a label holds only its DNS form):
# another customer whose id maps to the same name must not be applied over them.
CUSTOMER_ANNOTATION = "iotistic.io/customer"
# Which PROVISIONER_SECRET the customer's passwords derive from (a short HMAC of it and the
# customer: it tells two secrets apart and nothing about either). An apply with another secret
# (a stale .env, a chart that made the secret anew) would give every password a value the
# broker's admin has never had: refused instead.
SECRET_FINGERPRINT = "iotistic.io/secret-fingerprint"  # noqa: S105 (a name, not a secret)
CREDENTIALS_HASH = "iotistic.io/credentials-sha256"


def dns_label(customer_id: str) -> str:
    """The customer id as a DNS-1123 label (lower case, a-z0-9 and '-', at most 63)."""
    label = re.sub(r"[^a-z0-9-]", "-", customer_id.lower()).strip("-")
    return label[:63].rstrip("-") or "customer"


def check_customer_id(customer_id: str) -> None:
    """Refuse an id that is not its own DNS label: "Acme" and "acme", or "a_b" and "a-b",
    would share one namespace and one host name (signup's ids, lower-case UUIDs, all are)."""
    if dns_label(customer_id) != customer_id:
        raise BackendError(
            f"customer id {customer_id[:80]!r} is not a DNS label (a-z, 0-9 and '-', at most "
            "63): its namespace and host name could be another customer's"
        )


def credentials_hash(*values: str) -> str:
    """A short digest of credentials, for a pod template's annotation: when they change (a
    rotation), the template changes and the workload rolls; the values cannot be read back."""
    return hashlib.sha256("\0".join(values).encode()).hexdigest()[:16]


def namespace_of(customer_id: str, settings: KubernetesSettings) -> str:
    """``customer-<id>``."""
    return dns_label(f"{settings.namespace_prefix}{dns_label(customer_id)}")


def host_of(customer_id: str, settings: KubernetesSettings) -> str:
    """``<id>.<base domain>``, where the customer's instance answers."""
    return f"{dns_label(customer_id)}.{settings.base_domain}"


def object_meta(name: str, namespace: str | None, customer_id: str, **extra: Any) -> dict[str, Any]:
    """An object's metadata: ``name`` (in ``namespace``, unless None), the labels every object
    of the customer carries and those of ``extra["labels"]``, and the rest of ``extra``."""
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
