"""A deployment job continues the trace of what asked for it: the signup's, an operator's retry,
the health watch's decision. Each attempt is a ``job <kind>`` span, each step a ``step <name>``
span under it; the job's events name its request as their cause and carry the span they were
recorded in. Real Postgres, NATS, Mosquitto and instance processes (the local backend), started
through a wrapper that fails while the test leaves a file naming the customer.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from span_links import recorded_spans
from test_local_backend import IOTISTIC, PASSWORD, control  # noqa: F401 - control is a fixture

from contracts import (
    Cause,
    DeploymentRequested,
    Envelope,
    decode_envelope,
    decode_event,
    new_envelope,
)
from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.observability.telemetry import tracer
from libs.runtime.platform import Platform
from services.provisioner.leases import (
    Claimed,
    claim_next_job,
    complete_job,
    fail_job,
    record_progress,
)
from services.provisioner.queue import clean_jobs, enqueue, retry_job
from services.provisioner.queue_rules import DELETE as DELETE_KIND
from services.provisioner.queue_rules import DEPLOY as DEPLOY_KIND
from services.provisioner.queue_rules import Kind
from support import eventually, local_platform, signed_license_issued

pytestmark = pytest.mark.slow

DEPLOY = "job deploy-customer-stack"
LOCAL_DEPLOY_STEPS = ["database", "broker", "license", "instance", "health"]


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    with recorded_spans() as exporter:
        yield exporter


@pytest.fixture(scope="module")
async def platform(
    spans: InMemorySpanExporter,
    settings: ServiceSettings,
    store: EventStore,
    broker: Any,
    control: Path,  # noqa: F811 - the fixture
    port: int,
) -> Platform:
    return local_platform(
        settings,
        broker,
        port,
        control,
        local_instance_command=f"{control / 'instance.sh'} {IOTISTIC} run --target instance",
        instance_health_check_seconds=0.5,
        instance_health_timeout_seconds=1.0,
        instance_unhealthy_redeploy_seconds=3.0,
        instance_redeploy_backoff_max_seconds=120.0,
    )


# --- reading what happened ------------------------------------------------------------------------


async def events_of(store: EventStore, customer_id: str) -> list[Envelope]:
    """Every event of the customer on the log, in order."""
    return [
        decode_envelope(message.data)
        async for message in store.read(filters=[store.customer_filter(customer_id)])
    ]


def of_type(events: list[Envelope], kind: str) -> list[Envelope]:
    return [e for e in events if e.type == kind]


def trace_of(envelope: Envelope) -> tuple[str, str]:
    """The trace id and the span id an event was recorded in."""
    assert envelope.trace.traceparent is not None, f"{envelope.type} carries no trace"
    _, trace_id, span_id, _ = envelope.trace.traceparent.split("-")
    return trace_id, span_id


def hexes(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


def parent_of(span: ReadableSpan) -> str | None:
    return f"{span.parent.span_id:016x}" if span.parent is not None else None


def job_spans(spans: InMemorySpanExporter, job_id: str) -> list[ReadableSpan]:
    """The job's attempt spans, by attempt."""
    found = [
        s
        for s in spans.get_finished_spans()
        if s.name.startswith("job ") and (s.attributes or {}).get("iotistic.job_id") == job_id
    ]
    return sorted(found, key=lambda s: s.start_time or 0)


def children(spans: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    _, span_id = hexes(parent)
    found = [s for s in spans.get_finished_spans() if parent_of(s) == span_id]
    return sorted(found, key=lambda s: s.start_time or 0)


def span_with_id(spans: InMemorySpanExporter, span_id: str) -> ReadableSpan:
    [span] = [s for s in spans.get_finished_spans() if hexes(s)[1] == span_id]
    return span


async def finished_job(
    client: httpx.AsyncClient, admin: dict[str, str], customer_id: str, timeout: float = 90
) -> dict[str, Any]:
    async def latest() -> dict[str, Any] | None:
        jobs = (await client.get(f"/api/queue/customer/{customer_id}/jobs", headers=admin)).json()[
            "jobs"
        ]
        return jobs[0] if jobs else None

    job: dict[str, Any] = await eventually(
        latest,
        lambda j: j is not None and j["state"] in ("completed", "failed"),
        timeout=timeout,
        what="the job finished",
    )
    return job


async def attempts_traced(spans: InMemorySpanExporter, job_id: str, count: int) -> None:
    async def found() -> list[ReadableSpan]:
        return job_spans(spans, job_id)

    await eventually(found, lambda s: len(s) >= count, what=f"{count} attempt spans")


# --- the tests ------------------------------------------------------------------------------------


async def test_a_signups_deploy_job_and_its_steps_are_in_the_signups_trace(
    client: httpx.AsyncClient, admin: dict[str, str], store: EventStore, spans: InMemorySpanExporter
) -> None:
    trace_id = "5af7183fb1d4cf5f7b8e4c1a2d3e4f50"
    signed = await client.post(
        "/api/customers/signup",
        json={"email": "traced@example.com", "password": PASSWORD, "company_name": "Traced"},
        headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"},
    )
    assert signed.status_code == 201, signed.text
    customer_id = signed.json()["customer"]["customer_id"]
    job = await finished_job(client, admin, customer_id)
    assert (job["name"], job["state"], job["attempts"]) == ("deploy-customer-stack", "completed", 1)
    await attempts_traced(spans, job["id"], 1)
    events = await eventually(
        lambda: events_of(store, customer_id),
        lambda found: of_type(found, "DeploymentSucceeded"),
        what="the job's events on the log",
    )
    [signed_up] = [
        e
        for e in [
            decode_envelope(m.data) async for m in store.read(event_types=["CustomerSignedUp"])
        ]
        if e.customer_id == customer_id
    ]
    [requested] = of_type(events, "DeploymentRequested")
    [started] = of_type(events, "DeploymentStarted")
    progressed = of_type(events, "DeploymentProgressed")
    [succeeded] = of_type(events, "DeploymentSucceeded")
    assert len(progressed) == len(LOCAL_DEPLOY_STEPS)

    # Every event of the job names its request as its cause, in the signup's correlation and
    # trace.
    assert requested.correlation_id == signed_up.correlation_id
    for event in (started, *progressed, succeeded):
        assert event.causation_id == requested.event_id, event.type
        assert event.correlation_id == signed_up.correlation_id, event.type
        assert event.correlation_id != job["id"]
        assert trace_of(event)[0] == trace_id, event.type

    # One attempt span, a child of the span in which the provisioner queued the job (handling
    # the LicenseIssued the signup led to), with one child per step.
    [attempt] = job_spans(spans, job["id"])
    assert attempt.name == DEPLOY
    assert hexes(attempt)[0] == trace_id
    queued_in = span_with_id(spans, trace_of(requested)[1])
    assert queued_in.name == "apply LicenseIssued"
    assert (queued_in.attributes or {})["iotistic.service"] == "provisioner"
    assert parent_of(attempt) == hexes(queued_in)[1]
    attributes = attempt.attributes or {}
    assert attributes["iotistic.customer_id"] == customer_id
    assert (attributes["iotistic.attempt"], attributes["iotistic.backend"]) == (1, "local")
    assert attempt.status.status_code != StatusCode.ERROR
    assert attempt.resource.attributes["service.name"] == "iotistic-provisioner"
    steps = [s for s in children(spans, attempt) if s.name.startswith("step ")]
    assert [s.name for s in steps] == [f"step {name}" for name in LOCAL_DEPLOY_STEPS]
    # Each progress is recorded in its step's span, the outcome in the attempt's.
    assert [trace_of(e)[1] for e in progressed] == [hexes(s)[1] for s in steps]
    assert trace_of(succeeded)[1] == hexes(attempt)[1]
    # The steps run one after the other, all within the attempt.
    assert attempt.start_time is not None and attempt.end_time is not None
    for step, following in itertools.pairwise(steps):
        assert step.end_time is not None and following.start_time is not None
        assert step.end_time <= following.start_time
    assert steps[-1].end_time is not None and steps[-1].end_time <= attempt.end_time


async def test_a_failed_attempt_is_an_error_and_the_next_one_has_the_same_parent(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    store: EventStore,
    spans: InMemorySpanExporter,
    control: Path,  # noqa: F811 - the fixture
) -> None:
    customer_id = str(uuid.uuid4())
    (control / f"{customer_id}.fail").write_text("1")
    with tracer("test").start_as_current_span("licensing decides"):
        await store.publish(signed_license_issued(customer_id), customer_id=customer_id)
    job = await finished_job(client, admin, customer_id)
    assert (job["state"], job["attempts"]) == ("completed", 2)
    await attempts_traced(spans, job["id"], 2)
    first, second = job_spans(spans, job["id"])
    assert [(s.attributes or {})["iotistic.attempt"] for s in (first, second)] == [1, 2]
    assert first.status.status_code == StatusCode.ERROR
    assert "exited with code 3" in (first.status.description or "")
    assert second.status.status_code != StatusCode.ERROR
    # An automatic retry keeps the job's cause: both attempts hang from the same span.
    assert parent_of(first) == parent_of(second) is not None
    assert hexes(first)[0] == hexes(second)[0]
    # The step it failed in says so; the steps before it do not.
    first_steps = [s for s in children(spans, first) if s.name.startswith("step ")]
    assert first_steps[-1].name == "step health"
    assert first_steps[-1].status.status_code == StatusCode.ERROR
    assert all(s.status.status_code != StatusCode.ERROR for s in first_steps[:-1])
    events = await events_of(store, customer_id)
    [requested] = of_type(events, "DeploymentRequested")
    [failed] = of_type(events, "DeploymentFailed")
    assert failed.causation_id == requested.event_id
    assert trace_of(failed)[1] == hexes(first)[1]


async def test_an_operators_retry_runs_the_job_in_the_retry_requests_trace(
    client: httpx.AsyncClient,
    admin: dict[str, str],
    store: EventStore,
    spans: InMemorySpanExporter,
    control: Path,  # noqa: F811 - the fixture
) -> None:
    customer_id = str(uuid.uuid4())
    fail = control / f"{customer_id}.fail"
    fail.write_text("99")
    await store.publish(signed_license_issued(customer_id), customer_id=customer_id)
    job = await finished_job(client, admin, customer_id)
    assert job["state"] == "failed"
    fail.write_text("0")
    retry_trace = "6bf7183fb1d4cf5f7b8e4c1a2d3e4f51"
    retried = await client.post(
        f"/api/queue/jobs/{job['id']}/retry",
        headers={**admin, "traceparent": f"00-{retry_trace}-c7ad6b7169203332-01"},
    )
    assert retried.status_code == 200, retried.text
    again = await eventually(
        lambda: client.get(f"/api/queue/jobs/{job['id']}", headers=admin),
        lambda r: r.json()["state"] == "completed",
        timeout=60,
        what="the retried job completed",
    )
    attempts = job["attempts"] + again.json()["attempts"]
    await attempts_traced(spans, job["id"], attempts)
    last = job_spans(spans, job["id"])[-1]
    assert hexes(last)[0] == retry_trace
    assert last.status.status_code != StatusCode.ERROR
    request = span_with_id(spans, parent_of(last) or "")
    assert hexes(request)[0] == retry_trace
    assert (request.attributes or {})["iotistic.service"] == "provisioner"
    # The attempts before the retry stay in the first request's trace.
    assert all(hexes(s)[0] != retry_trace for s in job_spans(spans, job["id"])[:-1])

    events = await events_of(store, customer_id)
    [requested] = of_type(events, "DeploymentRequested")
    [retry] = of_type(events, "DeploymentRetried")
    assert retry.causation_id == requested.event_id
    assert retry.correlation_id == requested.correlation_id
    assert trace_of(retry) == (retry_trace, hexes(request)[1])
    after = of_type(events, "DeploymentStarted")[-1]
    assert after.causation_id == retry.event_id
    assert after.correlation_id == requested.correlation_id


async def test_a_health_watch_redeploy_starts_from_its_decision(
    client: httpx.AsyncClient, admin: dict[str, str], store: EventStore, spans: InMemorySpanExporter
) -> None:
    customer_id = str(uuid.uuid4())
    await store.publish(signed_license_issued(customer_id), customer_id=customer_id)
    first = await finished_job(client, admin, customer_id)
    assert first["state"] == "completed"
    status = await client.get(f"/api/customers/{customer_id}/deployment/status", headers=admin)
    pid = status.json()["backend"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        redeploy = await eventually(
            lambda: finished_job(client, admin, customer_id),
            lambda j: j["id"] != first["id"],
            timeout=90,
            what="the health watch's redeploy finished",
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    assert (redeploy["state"], redeploy["data"]["requested_by"]) == ("completed", "health-watch")
    await attempts_traced(spans, redeploy["id"], 1)
    events = await events_of(store, customer_id)
    [degraded] = of_type(events, "InstanceDegraded")
    requested = [
        e
        for e in of_type(events, "DeploymentRequested")
        if isinstance(event := decode_event(e), DeploymentRequested)
        and event.job_id == redeploy["id"]
    ]
    assert [(e.causation_id, e.correlation_id) for e in requested] == [
        (degraded.event_id, degraded.correlation_id)
    ]
    # The watch decided each in a trace of its own: the instance degraded, then its redeploy
    # (linked to that decision), which the job continues.
    decided = span_with_id(spans, trace_of(degraded)[1])
    assert decided.name == "schedule InstanceDegraded"
    assert decided.parent is None
    [attempt] = job_spans(spans, redeploy["id"])
    queued_in = span_with_id(spans, parent_of(attempt) or "")
    assert queued_in.name == "health redeploy"
    assert queued_in.parent is None
    assert (queued_in.attributes or {})["iotistic.customer_id"] == customer_id
    assert [f"{link.context.span_id:016x}" for link in queued_in.links] == [hexes(decided)[1]]
    assert trace_of(requested[0]) == hexes(queued_in)


# --- the queue keeps each job's cause -------------------------------------------------------------


async def queued(pool: asyncpg.Pool, customer_id: str, kind: Kind, cause: Envelope) -> str:
    async with pool.acquire() as conn, conn.transaction():
        return await enqueue(
            conn,
            customer_id=customer_id,
            kind=kind,
            plan="starter",
            license_id=None,
            requested_by="test",
            at=datetime.now(UTC),
            max_attempts=1,
            causation=cause,
        )


async def outbox(pool: asyncpg.Pool) -> list[Envelope]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT envelope FROM outbox ORDER BY id")
    return [decode_envelope(row["envelope"]) for row in rows]


async def claim(pool: asyncpg.Pool, capacity: int | None = None) -> Claimed | None:
    async with pool.acquire() as conn, conn.transaction():
        return await claim_next_job(
            conn,
            worker_id="w1",
            backend="local",
            concurrency=10,
            lease=timedelta(seconds=30),
            capacity=capacity,
        )


async def test_every_change_of_a_job_names_its_request_and_a_retry_becomes_its_cause(
    pool: asyncpg.Pool,
) -> None:
    customer_id = str(uuid.uuid4())
    issued = new_envelope(signed_license_issued(customer_id), customer_id=customer_id)
    job_id = await queued(pool, customer_id, DEPLOY_KIND, issued)
    [requested] = await outbox(pool)
    assert (requested.causation_id, requested.correlation_id) == (issued.event_id, issued.event_id)
    claimed = await claim(pool)
    assert claimed is not None and claimed.cause == Cause.of(requested)
    async with pool.acquire() as conn, conn.transaction():
        assert await record_progress(conn, claimed, "w1", 10, "database")
        assert await fail_job(conn, claimed, "w1", "broken", timedelta(seconds=1))
        await retry_job(conn, job_id, "admin")
    *changes, retried = (await outbox(pool))[1:]
    assert [e.type for e in changes] == [
        "DeploymentStarted",
        "DeploymentProgressed",
        "DeploymentFailed",
    ]
    for event in (*changes, retried):
        assert (event.causation_id, event.correlation_id) == (requested.event_id, issued.event_id)
    # The retried job's attempts are caused by the retry, in the same correlation.
    again = await claim(pool)
    assert again is not None and again.cause == Cause.of(retried)
    started = (await outbox(pool))[-1]
    assert (started.type, started.causation_id) == ("DeploymentStarted", retried.event_id)
    assert started.correlation_id == issued.event_id


async def test_a_job_queued_before_causes_were_kept_runs_and_records_without_one(
    pool: asyncpg.Pool,
) -> None:
    customer_id = str(uuid.uuid4())
    issued = new_envelope(signed_license_issued(customer_id), customer_id=customer_id)
    job_id = await queued(pool, customer_id, DEPLOY_KIND, issued)
    async with pool.acquire() as conn:
        await conn.execute("UPDATE queue_jobs SET cause = NULL WHERE job_id = $1", job_id)
    # A cause that does not read (mended by hand, say) holds nothing up either.
    broken = await queued(pool, str(uuid.uuid4()), DEPLOY_KIND, issued)
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE queue_jobs SET cause = '{\"event_id\": 7}' WHERE job_id = $1", broken
        )
    claimed = await claim(pool)
    assert claimed is not None and claimed.cause is None
    async with pool.acquire() as conn, conn.transaction():
        assert await complete_job(
            conn, claimed, "w1", backend="local", instance_url=None, components={}
        )
        assert await clean_jobs(conn, "completed", datetime.now(UTC) + timedelta(days=1), "admin")
    other = await claim(pool)
    assert other is not None and (other.job_id, other.cause) == (broken, None)
    changes = [e for e in await outbox(pool) if e.type != "DeploymentRequested"]
    assert [(e.type, e.customer_id) for e in changes] == [
        ("DeploymentStarted", customer_id),
        ("DeploymentSucceeded", customer_id),
        ("DeploymentJobRemoved", customer_id),
        ("DeploymentStarted", other.customer_id),
    ]
    assert all(e.causation_id is None for e in changes)


async def test_a_superseded_or_held_job_records_it_as_caused_by_its_own_request(
    pool: asyncpg.Pool,
) -> None:
    customer_id = str(uuid.uuid4())
    first = new_envelope(signed_license_issued(customer_id), customer_id=customer_id)
    await queued(pool, customer_id, DEPLOY_KIND, first)
    [requested] = await outbox(pool)
    # No room for another instance: the waiting deploy is held, as caused by its request.
    assert await claim(pool, capacity=0) is None
    [held] = (await outbox(pool))[1:]
    assert (held.type, held.causation_id) == ("DeploymentWaitingForCapacity", requested.event_id)
    closed = new_envelope(signed_license_issued(customer_id), customer_id=customer_id)
    await queued(pool, customer_id, DELETE_KIND, closed)
    superseded = next(e for e in await outbox(pool) if e.type == "DeploymentSuperseded")
    assert (superseded.causation_id, superseded.correlation_id) == (
        requested.event_id,
        first.event_id,
    )
