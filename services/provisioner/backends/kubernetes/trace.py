"""The trace a job hands the instance pod it starts: the ConfigMap ``instance-trace`` with the
W3C trace context of the job's span (``trace_environment``), which the pod reads into its
TRACEPARENT and TRACESTATE as it starts (optional keys: without them it starts a trace of its
own), so that the instance's first start is a span in the deploy's trace.

Not in the pod template: a trace id differs on every job, and a changed template rolls the
Deployment, so every license update would restart every instance for nothing but a trace id.
A changed ConfigMap rolls nothing; the pod a deploy creates, or a new license rolls, reads what
the job applied just before the Deployment. Once the instance is ready the ConfigMap is
emptied again, so a pod restarted later (a crash, an eviction) does not join that old trace.
An annotation on the Deployment object would not roll pods either, but a pod cannot read its
Deployment's annotations (the downward API gives only the pod's own). The ConfigMap is not one
of the customer's manifests (``objects``): the manifest digest, which the fleet rollout
compares, does not change with it.
"""

from __future__ import annotations

from typing import Any

from libs.observability.telemetry import (
    TRACEPARENT_VARIABLE,
    TRACESTATE_VARIABLE,
    trace_environment,
)
from services.provisioner.backends.kubernetes.api import KubeApi
from services.provisioner.backends.kubernetes.manifests.metadata import object_meta

TRACE_CONFIGMAP = "instance-trace"
INSTANCE = ("Deployment", "instance")
KEYS = {TRACEPARENT_VARIABLE: "traceparent", TRACESTATE_VARIABLE: "tracestate"}


def trace_env() -> list[dict[str, Any]]:
    """The instance container's TRACEPARENT and TRACESTATE, from the ConfigMap if it holds
    them (the same on every render: the pod template does not change with them)."""
    return [
        {
            "name": variable,
            "valueFrom": {
                "configMapKeyRef": {"name": TRACE_CONFIGMAP, "key": key, "optional": True}
            },
        }
        for variable, key in KEYS.items()
    ]


def trace_config(ns: str, customer_id: str, trace: dict[str, str]) -> dict[str, Any]:
    """The ConfigMap with ``trace`` (``trace_environment()``; empty: it holds none)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(TRACE_CONFIGMAP, ns, customer_id),
        "data": {KEYS[name]: value for name, value in trace.items() if name in KEYS},
    }


async def hand_trace_before(api: KubeApi, obj: dict[str, Any], ns: str, customer_id: str) -> bool:
    """Before ``obj`` is applied, if it is the instance Deployment, apply the current span's
    trace for the pod it starts. Whether it did (no span: no call)."""
    if (obj["kind"], obj["metadata"]["name"]) != INSTANCE:
        return False
    trace = trace_environment()
    if not trace:
        return False
    await api.apply(trace_config(ns, customer_id, trace), what="handing the trace to the instance")
    return True


async def take_trace_back(api: KubeApi, ns: str, customer_id: str) -> None:
    """Empty the ConfigMap: pods started from now on start traces of their own."""
    await api.apply_if_there(
        trace_config(ns, customer_id, {}), what="taking the trace back from the instance"
    )
