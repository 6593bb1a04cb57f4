"""A tenant's volumes sized by its plan, and sizes that only ever grow.

The plan's limits are in the license the spec carries: messages per day and retention days.
The claims are read without verifying the signature: the provisioner took the token from the
event log, where only licensing may append it, and sizing a volume is no trust decision.

Postgres data = messages per day x retention days x bytes per reading x headroom, in whole GiB
(at least ``min_data_gib``). Bytes per reading is the measured cost of one stored reading with
its indexes and hourly rollups (239 bytes measured by `./dev bench backup`, 240 by default);
the headroom (1.3) covers WAL (``max_wal_size`` 1 GiB), dead letters, and the day a dropped
partition waits for the retention sweep.

Volumes only grow. The data volume is the claim the Postgres StatefulSet's template names
(``data-postgres-0``), applied as an object of its own before the StatefulSet: the controller
adopts a claim of that name when it exists, so a new tenant's volume is born at the plan's size,
and a bigger size applied later is a volume expansion (where the StorageClass has
``allowVolumeExpansion``). The StatefulSet's ``volumeClaimTemplates`` are immutable, so they
stay as they are; they only matter if the claim is gone. A size smaller than the one the
cluster holds (a downgrade, or a tenant made before sizing by plan) is never applied:
``keep_grown`` raises it to what exists, and the quota follows.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass
from typing import Any

import msgspec

from contracts.license import LicenseClaims

GIB = 1024**3
# The claim the Postgres StatefulSet's volumeClaimTemplate "data" makes for its pod 0.
DATA_CLAIM = "data-postgres-0"
BACKUP_CLAIM = "backups"
# The broker's volume (its volumeClaimTemplate: dynamic security and persistence, a few MiB).
BROKER_GIB = 1
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([KMGTPE]i?|)$")
_FACTORS = {
    "": 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "Pi": 1024**5,
    "Ei": 1024**6,
}


@dataclass(frozen=True)
class PlanUsage:
    """What a plan lets a tenant store: readings per day, kept this many days."""

    messages_per_day: int
    retention_days: int


@dataclass(frozen=True)
class StoragePolicy:
    """How volumes are sized (KubernetesSettings carries one)."""

    bytes_per_reading: int = 240
    headroom: float = 1.3
    min_data_gib: int = 2
    # The size of a tenant whose license says nothing readable (tests' tokens, a broken one).
    fallback_data_gib: int = 10
    # A compressed custom-format dump's size against the data volume's (readings compress).
    dump_ratio: float = 0.2
    # Complete dumps kept, by plan (the backup CronJob runs daily); unknown plans get "starter".
    backups_kept: tuple[tuple[str, int], ...] = (
        ("trial", 3),
        ("starter", 7),
        ("professional", 14),
        ("enterprise", 14),
    )

    def kept(self, plan: str) -> int:
        """How many daily dumps the plan keeps."""
        table = dict(self.backups_kept)
        return table.get(plan, table.get("starter", 7))


@dataclass(frozen=True)
class TenantStorage:
    """The sizes of one tenant's volumes (GiB) and how many dumps it keeps."""

    data_gib: int
    backups_gib: int
    backups_kept: int
    broker_gib: int = BROKER_GIB

    @property
    def total_gib(self) -> int:
        """What the namespace's quota must allow: data, backups and the broker."""
        return self.data_gib + self.backups_gib + self.broker_gib


def plan_usage(license_jwt: str) -> PlanUsage | None:
    """The plan's readings per day and retention days from the license's claims (unverified:
    see the module's note), or None when the token's claims cannot be read."""
    parts = license_jwt.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = msgspec.json.decode(payload, type=LicenseClaims)
    except (ValueError, msgspec.DecodeError):
        return None
    return PlanUsage(claims.limits.mqttMessagesPerDay, claims.features.dataRetentionDays)


def data_gib(usage: PlanUsage | None, policy: StoragePolicy) -> int:
    """The Postgres volume for a plan: every reading it allows, kept as long as it says."""
    if usage is None:
        return policy.fallback_data_gib
    needed = usage.messages_per_day * usage.retention_days * policy.bytes_per_reading
    return max(policy.min_data_gib, math.ceil(needed * policy.headroom / GIB))


def tenant_storage(plan: str, license_jwt: str, policy: StoragePolicy) -> TenantStorage:
    """The tenant's volume sizes: data by plan, backups for the dumps it keeps (each one a
    compressed copy of a full data volume, plus one being written)."""
    data = data_gib(plan_usage(license_jwt), policy)
    kept = policy.kept(plan)
    backups = max(1, math.ceil(data * policy.dump_ratio * (kept + 1)))
    return TenantStorage(data_gib=data, backups_gib=backups, backups_kept=kept)


def gib_of(quantity: str) -> int:
    """A Kubernetes quantity (``10Gi``, ``2T``, ``500M``) in whole GiB, rounded up."""
    found = _QUANTITY.match(quantity.strip())
    if found is None:
        raise ValueError(f"not a storage quantity: {quantity!r}")
    return math.ceil(float(found.group(1)) * _FACTORS[found.group(2)] / GIB)


def claim_gib(claim: dict[str, Any] | None) -> int | None:
    """What a PersistentVolumeClaim holds now: the larger of its request and the capacity the
    volume reports (an expansion may be under way), in GiB; None when there is no claim."""
    if claim is None:
        return None
    sizes = [
        ((claim.get("spec") or {}).get("resources") or {}).get("requests", {}).get("storage"),
        ((claim.get("status") or {}).get("capacity") or {}).get("storage"),
    ]
    known = [gib_of(s) for s in sizes if isinstance(s, str)]
    return max(known) if known else None


def keep_grown(objects: list[dict[str, Any]], current: dict[str, int]) -> list[dict[str, Any]]:
    """``objects`` with no PersistentVolumeClaim smaller than the cluster holds now
    (``current``: claim name to GiB), and the quota's ``requests.storage`` raised to match.
    The objects given are not changed."""
    grown = dict(current)
    out: list[dict[str, Any]] = []
    extra = 0
    for obj in objects:
        if obj["kind"] == "PersistentVolumeClaim":
            name = obj["metadata"]["name"]
            wanted = gib_of(obj["spec"]["resources"]["requests"]["storage"])
            have = grown.get(name, 0)
            if have > wanted:
                extra += have - wanted
                obj = _with_size(obj, have)
        out.append(obj)
    if extra:
        out = [_with_more_quota(o, extra) if o["kind"] == "ResourceQuota" else o for o in out]
    return out


def _with_size(claim: dict[str, Any], gib: int) -> dict[str, Any]:
    spec = claim["spec"]
    resources = {**spec["resources"], "requests": {**spec["resources"]["requests"]}}
    resources["requests"]["storage"] = f"{gib}Gi"
    return {**claim, "spec": {**spec, "resources": resources}}


def _with_more_quota(quota: dict[str, Any], gib: int) -> dict[str, Any]:
    hard = dict(quota["spec"]["hard"])
    hard["requests.storage"] = f"{gib_of(hard['requests.storage']) + gib}Gi"
    return {**quota, "spec": {**quota["spec"], "hard": hard}}


def volume_claims(
    meta: dict[str, Any],
    backups_meta: dict[str, Any],
    storage: TenantStorage,
    storage_class: str | None,
) -> list[dict[str, Any]]:
    """The data claim (named as the StatefulSet's template names it) and the backups claim."""
    return [
        _claim_object(meta, storage.data_gib, storage_class),
        _claim_object(backups_meta, storage.backups_gib, storage_class),
    ]


def _claim_object(meta: dict[str, Any], gib: int, storage_class: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": f"{gib}Gi"}},
    }
    if storage_class:
        spec["storageClassName"] = storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}
