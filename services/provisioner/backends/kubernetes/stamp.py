"""The manifest stamp: once a deploy's or update's objects are applied and ready, the digest of
the set is recorded on the customer's namespace (``iotistic.io/manifest-sha256``); what the
fleet rollout (``services/provisioner/rollout.py``) compares with the digest of today's set."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from services.provisioner.backends.kubernetes.api import KubeApi

MANIFEST_ANNOTATION = "iotistic.io/manifest-sha256"
# A field manager of its own: the provisioner's apply of the Namespace (which does not carry
# the annotation) leaves it alone, and applying without it removes it (server-side apply).
STAMP_FIELD_MANAGER = "iotistic-provisioner-stamp"


def manifest_digest(objects: list[dict[str, Any]]) -> str:
    """sha256 of the objects in canonical JSON: equal exactly when the same manifests would be
    applied. Secrets' values are in it, so a changed derived password counts; they are random
    HMAC outputs, which a digest does not reveal."""
    canonical = json.dumps(objects, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def applied_digest(api: KubeApi, ns: str) -> str | None:
    """The digest stamped on the namespace ``ns``; None if none was (never, or by a version
    before the stamp)."""
    namespace = await api.get("v1", "Namespace", ns, None)
    annotations = ((namespace or {}).get("metadata") or {}).get("annotations") or {}
    value = annotations.get(MANIFEST_ANNOTATION)
    return str(value) if value else None


async def stamp(api: KubeApi, ns: str, digest: str) -> None:
    """Record ``digest`` on the namespace ``ns``."""
    await _apply_stamp(api, ns, {MANIFEST_ANNOTATION: digest})


async def clear_stamp(api: KubeApi, ns: str) -> None:
    """Remove the stamp from the namespace ``ns``, if it is there and not going."""
    namespace = await api.get("v1", "Namespace", ns, None)
    if namespace is None or (namespace.get("status") or {}).get("phase") == "Terminating":
        return  # nothing to take back, and an apply would make the namespace again
    await _apply_stamp(api, ns, None)


async def _apply_stamp(api: KubeApi, ns: str, annotations: dict[str, str] | None) -> None:
    metadata: dict[str, Any] = {"name": ns}
    if annotations:
        metadata["annotations"] = annotations
    await api.apply(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": metadata},
        STAMP_FIELD_MANAGER,
        what=f"stamping namespace {ns}",
    )
