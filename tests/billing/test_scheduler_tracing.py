"""A TrialExpired names the TrialStarted it ends and links to its trace (issue 19)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from span_links import envelopes_of, recorded_spans, span_ids, spans_named

from contracts import CustomerSignedUp, Envelope
from libs.config import ServiceSettings
from libs.db.postgres import create_pool
from libs.eventlog.store import EventStore
from libs.observability.telemetry import tracer
from libs.runtime.platform import Platform
from services.billing.app import BILLING
from services.billing.trials import expire_ended_trials
from support import assert_replays_clean, eventually


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    with recorded_spans() as exporter:
        yield exporter


@pytest.fixture(scope="module")
async def pool(settings: ServiceSettings, store: EventStore) -> AsyncIterator[asyncpg.Pool]:
    """Billing running, its scheduler's one pass done at start: the tests take the passes."""
    platform = Platform.from_settings(settings, [BILLING], trial_scan_seconds=3600)
    await platform.start()
    await platform.wait_started()
    pool = await create_pool(settings.database_url, "billing")
    try:
        yield pool
    finally:
        await pool.close()
        await platform.stop()


async def signed_up_20_days_ago(store: EventStore, pool: asyncpg.Pool) -> str:
    """A customer whose 14-day trial ended six days ago, signed up in a request's trace, with
    the trial recorded."""
    customer_id = str(uuid.uuid4())
    with tracer("test").start_as_current_span("POST /api/customers/signup"):
        await store.publish(
            CustomerSignedUp(
                customer_id=customer_id,
                email=f"{customer_id}@example.com",
                email_display=f"{customer_id}@example.com",
                company_name="Traced Air",
                signed_up_at=datetime.now(UTC) - timedelta(days=20),
                trial_days=14,
            ),
            customer_id=customer_id,
        )
    await eventually(
        lambda: pool.fetchval(
            "SELECT status FROM subscriptions WHERE customer_id = $1", customer_id
        ),
        lambda status: status == "trialing",
        what="the trial recorded",
    )
    return customer_id


async def only(store: EventStore, event_type: str, customer_id: str) -> Envelope:
    found = await envelopes_of(store, event_type, customer_id)
    assert len(found) == 1, (event_type, found)
    return found[0]


def scheduled_for(spans: InMemorySpanExporter, envelope: Envelope) -> ReadableSpan:
    """The one ``schedule <type>`` span the event was appended in."""
    found = [
        s
        for s in spans_named(spans, f"schedule {envelope.type}")
        if (s.attributes or {}).get("iotistic.event_id") == envelope.event_id
    ]
    assert len(found) == 1, found
    return found[0]


async def test_a_trial_that_ends_expires_caused_by_the_trial_it_ends(
    spans: InMemorySpanExporter, store: EventStore, pool: asyncpg.Pool
) -> None:
    customer_id = await signed_up_20_days_ago(store, pool)
    signed_up = await only(store, "CustomerSignedUp", customer_id)
    started = await only(store, "TrialStarted", customer_id)
    assert started.correlation_id == signed_up.correlation_id

    # Whatever span the pass runs in (none, in the scheduler's task), the decision is a root.
    with tracer("test").start_as_current_span("a pass"):
        assert await expire_ended_trials(pool, store, datetime.now(UTC)) == 1

    expired = await only(store, "TrialExpired", customer_id)
    assert expired.causation_id == started.event_id
    assert expired.correlation_id == signed_up.correlation_id
    span = scheduled_for(spans, expired)
    # A trace of its own: the scheduler decided, weeks after the signup's request ended...
    assert span.parent is None
    assert span.context is not None
    started_trace, started_span = span_ids(started)
    assert span.context.trace_id != started_trace
    assert span_ids(expired) == (span.context.trace_id, span.context.span_id)
    # ... linked to the span the TrialStarted was appended in.
    assert [(link.context.trace_id, link.context.span_id) for link in span.links] == [
        (started_trace, started_span)
    ]
    attributes = span.attributes or {}
    assert attributes["iotistic.customer_id"] == customer_id
    assert attributes["iotistic.causation_id"] == started.event_id
    assert attributes["iotistic.outcome"] == "appended"


async def test_a_pass_with_nothing_due_makes_no_span(
    spans: InMemorySpanExporter, store: EventStore, pool: asyncpg.Pool
) -> None:
    customer_id = await signed_up_20_days_ago(store, pool)
    assert await expire_ended_trials(pool, store, datetime.now(UTC)) == 1
    await eventually(
        lambda: pool.fetchval(
            "SELECT status FROM subscriptions WHERE customer_id = $1", customer_id
        ),
        lambda status: status == "expired",
        what="the expiry applied",
    )
    before = len(spans.get_finished_spans())

    assert await expire_ended_trials(pool, store, datetime.now(UTC)) == 0

    made = [s.name for s in spans.get_finished_spans()[before:]]
    assert not [name for name in made if name.startswith("schedule ")], made


@pytest.mark.parametrize("kept", [None, '{"not": "a cause"}', '"a string"'])
async def test_a_trial_recorded_without_a_readable_cause_still_expires(
    spans: InMemorySpanExporter, store: EventStore, pool: asyncpg.Pool, kept: str | None
) -> None:
    # Trials recorded before causes were kept (or a cause that no longer reads): the trial
    # expires as it did, starting a chain of its own.
    customer_id = await signed_up_20_days_ago(store, pool)
    await pool.execute(
        "UPDATE subscriptions SET trial_cause = $2::jsonb WHERE customer_id = $1",
        customer_id,
        kept,
    )

    assert await expire_ended_trials(pool, store, datetime.now(UTC)) == 1

    expired = await only(store, "TrialExpired", customer_id)
    assert expired.causation_id is None
    assert expired.correlation_id == expired.event_id
    span = scheduled_for(spans, expired)
    assert span.parent is None
    assert list(span.links) == []


async def test_replaying_the_subscriptions_keeps_each_trials_cause(
    settings: ServiceSettings, store: EventStore, pool: asyncpg.Pool
) -> None:
    customer_id = await signed_up_20_days_ago(store, pool)
    started = await only(store, "TrialStarted", customer_id)
    kept = await trial_cause(pool, customer_id)
    assert kept == {
        "event_id": started.event_id,
        "correlation_id": started.correlation_id,
        "trace": {"traceparent": started.trace.traceparent, "tracestate": None},
    }
    # The tests above blanked some causes by hand; what the log says is restored for those.
    # Rebuilt and swapped in, then checked: the live rows are what the log rebuilds.
    await assert_replays_clean(settings.database_url, store, [BILLING], rebuild=True)
    assert await trial_cause(pool, customer_id) == kept
    blank = await pool.fetchval("SELECT count(*) FROM subscriptions WHERE trial_cause IS NULL")
    assert blank == 0


async def trial_cause(pool: asyncpg.Pool, customer_id: str) -> Any:
    raw = await pool.fetchval(
        "SELECT trial_cause FROM subscriptions WHERE customer_id = $1", customer_id
    )
    return None if raw is None else json.loads(raw)


async def test_the_trial_scheduler_decides_in_billings_name(
    spans: InMemorySpanExporter, fresh_log: Any
) -> None:
    settings, store = await fresh_log()
    platform = Platform.from_settings(settings, [BILLING], trial_scan_seconds=0.2)
    await platform.start()
    await platform.wait_started()
    pool = await create_pool(settings.database_url, "billing")
    try:
        customer_id = await signed_up_20_days_ago(store, pool)
        expired = await eventually(
            lambda: envelopes_of(store, "TrialExpired", customer_id), what="the trial expired"
        )
        started = await only(store, "TrialStarted", customer_id)
        assert expired[0].causation_id == started.event_id
        span = scheduled_for(spans, expired[0])
        assert (span.attributes or {})["iotistic.service"] == "billing"
    finally:
        await pool.close()
        await platform.stop()
