"""The event store against a real JetStream server."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
from nats.js import api
from tcp_relay import TcpRelay

from contracts import CustomerSignedUp, decode_envelope, new_envelope
from libs.eventlog.errors import ConcurrencyConflict
from libs.eventlog.reader import ReadPosition
from libs.eventlog.store import EventStore
from support import connect_harness


def signed_up(customer_id: str | None = None, email: str = "ada@example.com") -> CustomerSignedUp:
    return CustomerSignedUp(
        customer_id=customer_id or str(uuid.uuid4()),
        email=email,
        email_display=email,
        company_name="Analytical Engines Ltd",
        signed_up_at=datetime(2026, 11, 24, 12, 0, tzinfo=UTC),
    )


async def test_stream_is_declared_idempotently_with_file_storage(store: EventStore) -> None:
    first = await store.ensure_stream()
    second = await store.ensure_stream()
    assert first.config.name == second.config.name == store.stream
    assert second.config.storage == api.StorageType.FILE
    assert second.config.discard == api.DiscardPolicy.NEW
    assert second.config.subjects == [f"{store.prefix}.>"]
    assert second.config.duplicate_window == store.settings.events_duplicate_window_seconds


async def test_the_same_event_appended_twice_is_stored_once(store: EventStore) -> None:
    event = signed_up()
    envelope = new_envelope(event, customer_id=event.customer_id)
    before = await store.last_seq()
    first = await store.append(envelope)
    again = await store.append(envelope)
    assert not first.duplicate
    assert again.duplicate
    assert again.seq == first.seq
    assert await store.last_seq() == before + 1
    msg = await store.js.get_msg(store.stream, first.seq)
    assert msg.headers is not None
    assert msg.headers["Nats-Msg-Id"] == envelope.event_id
    assert decode_envelope(msg.data or b"") == envelope


async def test_first_writer_wins_on_a_subject(store: EventStore) -> None:
    key = uuid.uuid4().hex
    events = [signed_up() for _ in range(20)]

    async def try_append(event: CustomerSignedUp) -> str:
        try:
            await store.publish(
                event, customer_id=event.customer_id, key=key, expected_last_subject_seq=0
            )
        except ConcurrencyConflict:
            return "conflict"
        return "stored"

    outcomes = await asyncio.gather(*(try_append(e) for e in events))
    assert outcomes.count("stored") == 1
    assert outcomes.count("conflict") == 19
    counts = await store.count_by_subject(store.subject("CustomerSignedUp", key))
    assert counts == {store.subject("CustomerSignedUp", key): 1}
    assert await store.last_seq_of("CustomerSignedUp", key) > 0


async def test_trace_context_travels_in_envelope_and_headers(store: EventStore) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    event = signed_up()
    with tracer.start_as_current_span("signup request") as span:
        appended = await store.publish(event, customer_id=event.customer_id)
    trace_id = f"{span.get_span_context().trace_id:032x}"
    assert appended.envelope.trace.traceparent is not None
    assert trace_id in appended.envelope.trace.traceparent
    msg = await store.js.get_msg(store.stream, appended.seq)
    assert msg.headers is not None
    assert msg.headers["traceparent"] == appended.envelope.trace.traceparent


async def test_read_returns_the_range_in_order_filtered_by_type(store: EventStore) -> None:
    start = await store.last_seq() + 1
    events = [signed_up() for _ in range(5)]
    appended = [await store.publish(e, customer_id=e.customer_id) for e in events]
    seqs = [m.seq async for m in store.read(from_seq=start, event_types=["CustomerSignedUp"])]
    assert seqs == [a.seq for a in appended]
    bounded = [m.seq async for m in store.read(from_seq=start, to_seq=appended[2].seq)]
    assert bounded == [a.seq for a in appended[:3]]
    assert [m async for m in store.read(from_seq=start, event_types=["TrialStarted"])] == []


async def test_a_read_whose_fetch_times_out_mid_log_still_reads_to_the_end(
    store: EventStore, nats_url: str
) -> None:
    start = await store.last_seq() + 1
    events = [signed_up() for _ in range(12)]
    appended = [await store.publish(e, customer_id=e.customer_id) for e in events]
    async with TcpRelay(nats_url) as relay:
        nc = await connect_harness(relay.url, name="stalled reader")
        try:
            reader = EventStore(nc.jetstream(), store.settings)
            seen: list[int] = []
            position = ReadPosition()

            async def read_all() -> None:
                async for message in reader.read(from_seq=start, batch=4, position=position):
                    seen.append(message.seq)
                    if len(seen) == 4:
                        relay.hold()  # the next batch is held up longer than a fetch waits

            asked = relay.watch_client(b"CONSUMER.INFO")
            reading = asyncio.create_task(read_all())
            # The reader either gives up at the timeout (the bug) or asks the server how far
            # its consumer got; either way the network recovers then.
            await asyncio.wait(
                {reading, asyncio.create_task(asked.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            relay.release()
            await reading
        finally:
            await nc.close()
    assert seen == [a.seq for a in appended]
    assert position.through == appended[-1].seq


def test_subject_keys_are_validated(store: EventStore) -> None:
    with pytest.raises(ValueError, match="subject key"):
        store.subject("CustomerSignedUp", "a.b")
    with pytest.raises(ValueError, match="subject key"):
        store.subject("CustomerSignedUp", "")
