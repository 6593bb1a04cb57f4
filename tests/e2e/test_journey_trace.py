"""One customer's journey is one trace, as a collector receives it.

The platform runs as ``iotistic run --target all`` (every service in one process) on the local
backend, exporting over OTLP/HTTP to a real receiver that decodes opentelemetry-proto; a
customer signs up and waits for a healthy instance. The signup request's trace must then hold
every projection and reactor span the journey caused, the deployment job and each of its steps,
and the instance's first start, each under its own service's name, with no span whose parent is
missing. A scheduled decision taken on the journey (the health watch's) may start a trace of its
own, but then links to this one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from journey_steps import (
    JOB_SPAN,
    MILESTONES,
    hops,
    platform_environment,
    running_platform,
    sign_up_until_healthy,
    signup_trace,
)
from otlp_receiver import ReceivedSpan, Receiver, otlp_receiver

from libs.servers.mosquitto import EmbeddedMosquitto
from libs.servers.ports import free_port
from support import create_database, eventually, license_keys_dir, nats_credentials_dir

pytestmark = pytest.mark.slow

# Who applies each event of the journey (projections and reactors), by service.
APPLIED_BY = {
    "CustomerSignedUp": {"signup", "licensing", "billing"},
    "LicenseIssued": {"signup", "licensing", "provisioner"},
    "TrialStarted": {"signup", "billing"},
    "DeploymentRequested": {"signup", "provisioner"},
    "DeploymentStarted": {"signup", "provisioner"},
    "DeploymentProgressed": {"signup", "provisioner"},
    "DeploymentSucceeded": {"signup", "provisioner"},
}


def _complete(receiver: Receiver) -> tuple[list[ReceivedSpan], set[object]]:
    """The journey's trace so far, and what this test looks for that it does not hold yet."""
    spans = receiver.spans()
    try:
        trace_id = signup_trace(spans)
    except ValueError:
        return [], {"the signup request"}
    trace = [s for s in spans if s.trace_id == trace_id]
    have = {(s.service_name, s.name) for s in trace}
    wanted: set[object] = {
        (f"iotistic-{service}", f"apply {event}")
        for event, services in APPLIED_BY.items()
        for service in services
    }
    wanted |= {
        ("iotistic-provisioner", JOB_SPAN),
        ("iotistic-provisioner", "step health"),
        ("iotistic-instance", "instance start"),
    }
    return trace, wanted - have


async def test_a_signup_and_everything_it_causes_is_one_trace_with_named_services(
    postgres_server_url: str, nats_url: str, broker: EmbeddedMosquitto, tmp_path: Path
) -> None:
    with otlp_receiver() as receiver:
        env = platform_environment(
            database_url=await create_database(postgres_server_url),
            nats_url=nats_url,
            broker=broker,
            folder=tmp_path,
            port=free_port(),
            license_keys=license_keys_dir(),
            credentials_dir=nats_credentials_dir(),
            otlp_endpoint=receiver.endpoint,
        )
        async with running_platform(env) as client:
            journey = await sign_up_until_healthy(client)
            trace, _ = await eventually(
                lambda: _now(_complete(receiver)),
                lambda found: not found[1],
                timeout=30,
                what="the journey's whole trace at the receiver (missing: last[1])",
            )
        everything = receiver.spans()
    by_id = {s.span_id: s for s in trace}
    [request] = [s for s in trace if s.kind == "SERVER" and "signup" in s.name]
    assert request.service_name == "iotistic-signup"
    assert request.parent_span_id == ""  # the journey starts at the customer's request

    # Every span's parent is in the trace: nothing was cut off into a trace of its own.
    orphans = [
        (s.name, s.service_name)
        for s in trace
        if s.parent_span_id and s.parent_span_id not in by_id
    ]
    assert orphans == []

    # The job and each step, the provisioner's; the steps are children of the job.
    [job] = [s for s in trace if s.name == JOB_SPAN]
    assert job.service_name == "iotistic-provisioner"
    assert job.attributes["iotistic.customer_id"] == journey.customer_id
    steps = [s for s in trace if s.name.startswith("step ")]
    assert {s.name for s in steps} >= {"step instance", "step health"}
    assert all(s.parent_span_id == job.span_id for s in steps)
    assert all(s.service_name == "iotistic-provisioner" for s in steps)

    # The instance's first start, the instance's, inside the step that started it.
    [start] = [s for s in trace if s.name == "instance start"]
    assert start.service_name == "iotistic-instance"
    ancestors = _ancestors(start, by_id)
    assert job.span_id in ancestors

    # Each consumer's span is its own service's; the process is one, the names are not.
    services = {s.service_name for s in trace}
    assert services >= {
        "iotistic-signup",
        "iotistic-licensing",
        "iotistic-billing",
        "iotistic-provisioner",
        "iotistic-instance",
    }
    assert "iotistic-all" not in {s.service_name for s in everything if s.name.startswith("apply ")}

    # An event applied in another trace came from a decision that links back to this one.
    strays = {
        (s.name, s.service_name)
        for s in everything
        if s.name.startswith("apply ")
        and s.trace_id != request.trace_id
        and not _linked_trace(s.trace_id, everything, request.trace_id)
    }
    assert strays == set()

    # The hops read off the trace (the README's table) are all there, in order.
    measured = hops(trace)
    # Every milestone is there (five hops and the whole), each after the one before.
    assert len(measured) == len(MILESTONES), measured
    assert all(ms >= 0 for ms in measured.values()), measured


def _ancestors(span: ReceivedSpan, by_id: dict[str, ReceivedSpan]) -> set[str]:
    found: set[str] = set()
    while span.parent_span_id in by_id:
        found.add(span.parent_span_id)
        span = by_id[span.parent_span_id]
    return found


def _linked_trace(trace_id: str, spans: list[ReceivedSpan], journey: str) -> bool:
    """Whether a span of trace ``trace_id`` links to the journey's trace."""
    return any(s.trace_id == trace_id and any(t == journey for t, _ in s.links) for s in spans)


async def _now(
    value: tuple[list[ReceivedSpan], set[object]],
) -> tuple[list[ReceivedSpan], set[object]]:
    return value
