"""The spans this test process finishes, in memory, and how to follow one trace to another.

OpenTelemetry takes a global tracer provider once per process: the first module that asks for
spans installs it (``setup_tracing``, as the platform does); a module asking later, after another
module installed one, adds its exporter to that one instead of being refused.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from contracts import Envelope, decode_envelope
from libs.eventlog.store import EventStore
from libs.observability.telemetry import setup_tracing


def recording_spans() -> InMemorySpanExporter:
    """A new exporter that records every span finished in this process from now on."""
    exporter = InMemorySpanExporter()
    installed = trace.get_tracer_provider()
    if isinstance(installed, TracerProvider):
        installed.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        setup_tracing("iotistic-test", "none", (SimpleSpanProcessor(exporter),))
    return exporter


def span_ids(envelope: Envelope) -> tuple[int, int]:
    """The trace id and span id of the span an event was appended in (its traceparent)."""
    traceparent = envelope.trace.traceparent
    assert traceparent is not None, f"{envelope.type} {envelope.event_id} carries no trace"
    _, trace_id, span_id, _ = traceparent.split("-")
    return int(trace_id, 16), int(span_id, 16)


def spans_named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    """The finished spans called ``name``, oldest first."""
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def envelopes_of(store: EventStore, event_type: str, customer_id: str) -> list[Envelope]:
    """The envelopes of one customer's events of one type, in log order."""
    found = []
    async for message in store.read(event_types=[event_type]):
        envelope = decode_envelope(message.data)
        if envelope.customer_id == customer_id:
            found.append(envelope)
    return found
