"""How the backend reads a workload's state: rolled out (``ready``), or why it does not serve
(``serving_trouble``)."""

from __future__ import annotations

from typing import Any


def ready(obj: dict[str, Any] | None) -> bool:
    """Whether a workload has rolled out: observed its generation, wanted replicas ready."""
    if obj is None:
        return False
    status = obj.get("status") or {}
    wanted = (obj.get("spec") or {}).get("replicas", 1)
    generation = (obj.get("metadata") or {}).get("generation", 0)
    if status.get("observedGeneration", 0) < generation:
        return False
    if obj.get("kind") == "Deployment":
        updated = status.get("updatedReplicas", 0)
        return bool(updated >= wanted and status.get("availableReplicas", 0) >= wanted)
    return bool(status.get("readyReplicas", 0) >= wanted)


def serving_trouble(obj: dict[str, Any]) -> str | None:
    """Why a workload does not serve now (fewer ready replicas than wanted, or a Deployment
    whose Available condition is False), or None when it serves. Unlike ``ready``, a rollout in
    progress is no trouble while the wanted replicas are ready."""
    status = obj.get("status") or {}
    wanted = (obj.get("spec") or {}).get("replicas", 1)
    name = f"{obj.get('kind', 'workload')} {(obj.get('metadata') or {}).get('name', '?')}"
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Available" and condition.get("status") == "False":
            why = condition.get("reason") or condition.get("message") or "unavailable"
            return f"{name} not available: {str(why)[:120]}"
    have = status.get("readyReplicas", 0) or 0
    if have < wanted:
        return f"{name}: {have} of {wanted} replicas ready"
    return None
