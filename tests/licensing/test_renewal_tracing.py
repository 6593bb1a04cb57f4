"""A renewal names the license it renews and links to its trace (issue 19)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from span_links import envelopes_of, recorded_spans, span_ids, spans_named

from contracts import CustomerSignedUp, Envelope, SubscriptionActivated, decode_event
from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.observability.telemetry import tracer
from libs.runtime.platform import Platform
from services.licensing.app import LICENSING
from services.licensing.issuing import LicenseSigner
from services.licensing.keys import load_keyring
from services.licensing.renewals import renew_due_licenses
from support import assert_replays_clean, eventually, license_keys_dir

BEFORE = timedelta(days=7)


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    with recorded_spans() as exporter:
        yield exporter


@pytest.fixture(scope="module")
async def pool(settings: ServiceSettings, store: EventStore) -> AsyncIterator[asyncpg.Pool]:
    """Licensing running; the tests take the scheduler's passes."""
    platform = Platform.from_settings(
        settings,
        [LICENSING],
        license_keys_dir=license_keys_dir(),
        license_renewal_scan_seconds=3600,
    )
    await platform.start()
    await platform.wait_started()
    try:
        yield platform.runtime_of("licensing").db()
    finally:
        await platform.stop()


@pytest.fixture(scope="module")
def signer() -> LicenseSigner:
    return LicenseSigner(load_keyring(Path(license_keys_dir())))


async def subscribed(store: EventStore, pool: asyncpg.Pool) -> str:
    """A customer who signed up and then paid, in a checkout's trace; both licenses recorded."""
    customer_id = str(uuid.uuid4())
    await store.publish(
        CustomerSignedUp(
            customer_id=customer_id,
            email=f"{customer_id}@example.com",
            email_display=f"{customer_id}@example.com",
            company_name="Renewing Air",
            signed_up_at=datetime.now(UTC),
        ),
        customer_id=customer_id,
    )
    with tracer("test").start_as_current_span("POST /api/stripe/webhook"):
        await store.publish(
            SubscriptionActivated(
                customer_id=customer_id,
                plan="professional",
                status="active",
                stripe_customer_id=f"cus_{customer_id[:8]}",
                stripe_subscription_id=f"sub_{customer_id[:8]}",
                current_period_end=datetime.now(UTC) + timedelta(days=30),
            ),
            customer_id=customer_id,
        )
    await eventually(
        lambda: licenses(pool, customer_id), lambda rows: len(rows) == 2, what="two licenses"
    )
    return customer_id


async def licenses(pool: asyncpg.Pool, customer_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pool.fetch(
        "SELECT * FROM licenses WHERE customer_id = $1 ORDER BY issued_at", customer_id
    )
    return rows


async def issued(store: EventStore, license_id: str, customer_id: str) -> Envelope:
    """The LicenseIssued envelope of one license."""
    for envelope in await envelopes_of(store, "LicenseIssued", customer_id):
        if getattr(decode_event(envelope), "license_id", None) == license_id:
            return envelope
    raise AssertionError(f"no LicenseIssued for {license_id}")


async def renew_newest(
    store: EventStore, pool: asyncpg.Pool, signer: LicenseSigner, customer_id: str
) -> tuple[Envelope, Envelope]:
    """Renew the customer's newest license when it is due: (its LicenseIssued, the renewal's)."""
    current = (await licenses(pool, customer_id))[-1]
    due = current["expires_at"] - BEFORE + timedelta(hours=1)
    # Whatever span the pass runs in (none, in the scheduler's task), the decision is a root.
    with tracer("test").start_as_current_span("a pass"):
        assert await renew_due_licenses(pool, store, signer, due, BEFORE) == 1
    rows = await eventually(
        lambda: licenses(pool, customer_id),
        lambda rows: rows[-1]["license_id"] != current["license_id"],
        what="the renewal recorded",
    )
    renewed = await issued(store, current["license_id"], customer_id)
    return renewed, await issued(store, rows[-1]["license_id"], customer_id)


async def test_a_renewal_is_caused_by_the_license_it_renews(
    spans: InMemorySpanExporter, store: EventStore, pool: asyncpg.Pool, signer: LicenseSigner
) -> None:
    customer_id = await subscribed(store, pool)
    activated = (await envelopes_of(store, "SubscriptionActivated", customer_id))[0]

    subscription, renewal = await renew_newest(store, pool, signer, customer_id)
    assert decode_event(subscription).license_type == "subscription"  # type: ignore[attr-defined]
    assert renewal.causation_id == subscription.event_id
    assert renewal.correlation_id == activated.correlation_id == subscription.correlation_id
    assert_scheduled_in_a_trace_linked_to(spans, renewal, subscription)

    # The renewal's renewal is caused by the renewal, in the same chain.
    renewal_again, next_renewal = await renew_newest(store, pool, signer, customer_id)
    assert renewal_again.event_id == renewal.event_id
    assert next_renewal.causation_id == renewal.event_id
    assert next_renewal.correlation_id == activated.correlation_id
    assert_scheduled_in_a_trace_linked_to(spans, next_renewal, renewal)


def assert_scheduled_in_a_trace_linked_to(
    spans: InMemorySpanExporter, appended: Envelope, cause: Envelope
) -> None:
    found = [
        s
        for s in spans_named(spans, "schedule LicenseIssued")
        if (s.attributes or {}).get("iotistic.event_id") == appended.event_id
    ]
    assert len(found) == 1, found
    span = found[0]
    assert span.parent is None and span.context is not None
    assert span_ids(appended) == (span.context.trace_id, span.context.span_id)
    assert [(link.context.trace_id, link.context.span_id) for link in span.links] == [
        span_ids(cause)
    ]
    assert (span.attributes or {})["iotistic.customer_id"] == appended.customer_id


async def test_a_license_recorded_without_a_cause_is_renewed_without_causation(
    spans: InMemorySpanExporter, store: EventStore, pool: asyncpg.Pool, signer: LicenseSigner
) -> None:
    customer_id = await subscribed(store, pool)
    await pool.execute("UPDATE licenses SET cause = NULL WHERE customer_id = $1", customer_id)

    _, renewal = await renew_newest(store, pool, signer, customer_id)

    assert renewal.causation_id is None
    assert renewal.correlation_id == renewal.event_id
    found = [
        s
        for s in spans_named(spans, "schedule LicenseIssued")
        if (s.attributes or {}).get("iotistic.event_id") == renewal.event_id
    ]
    assert len(found) == 1 and list(found[0].links) == []


async def test_replaying_the_licenses_keeps_each_licenses_cause(
    settings: ServiceSettings, store: EventStore, pool: asyncpg.Pool
) -> None:
    customer_id = await subscribed(store, pool)
    before = {
        row["license_id"]: json.loads(row["cause"]) for row in await licenses(pool, customer_id)
    }
    for license_id, cause in before.items():
        envelope = await issued(store, license_id, customer_id)
        assert cause["event_id"] == envelope.event_id
        assert cause["correlation_id"] == envelope.correlation_id
        assert cause["trace"]["traceparent"] == envelope.trace.traceparent
    # Rebuilt and swapped in, then checked: the live rows are what the log rebuilds.
    await assert_replays_clean(settings.database_url, store, [LICENSING], rebuild=True)
    after = {
        row["license_id"]: json.loads(row["cause"]) for row in await licenses(pool, customer_id)
    }
    assert after == before
    # The causes blanked by hand above are back, as the log has them.
    assert await pool.fetchval("SELECT count(*) FROM licenses WHERE cause IS NULL") == 0
