"""The spans this test process finishes, in memory, and how to follow one trace to another.

OpenTelemetry takes a global tracer provider once per process (a second ``setup_tracing`` is
refused), so every test module that records spans goes through ``recorded_spans``: the first
installs the provider, as the platform does, with one exporter that hands each finished span to
the exporters of the modules recording at the moment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import Link, SpanKind, TraceState
from opentelemetry.util.types import Attributes

from contracts import Envelope, decode_envelope
from libs.eventlog.store import EventStore
from libs.observability.telemetry import setup_tracing


class _Recorders(SpanExporter):
    """Hands each finished span to every exporter recording now."""

    def __init__(self) -> None:
        self.recording: list[InMemorySpanExporter] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for exporter in list(self.recording):
            exporter.export(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.recording.clear()


_recorders: _Recorders | None = None


class _WhileRecording(Sampler):
    """Spans are recorded only while a test module records them. The provider is the
    process's for good once installed; recording every span of every test after it (each
    request, each event applied) would cost all of them, for nobody."""

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        recording = _recorders is not None and bool(_recorders.recording)
        chosen = ALWAYS_ON if recording else ALWAYS_OFF
        return chosen.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return "WhileRecording"


@contextlib.contextmanager
def recorded_spans() -> Iterator[InMemorySpanExporter]:
    """Every span finished in this process while the block runs, in memory (for a
    module-scoped fixture: ``with recorded_spans() as spans: yield spans``)."""
    global _recorders
    if _recorders is None:
        _recorders = _Recorders()
        processor = SimpleSpanProcessor(_recorders)
        installed = trace.get_tracer_provider()
        if isinstance(installed, TracerProvider):
            # Installed elsewhere (not through here): spans keep that provider's resource.
            installed.add_span_processor(processor)
        else:
            setup_tracing("iotistic-test", "none", (processor,), sampler=_WhileRecording())
    exporter = InMemorySpanExporter()
    _recorders.recording.append(exporter)
    try:
        yield exporter
    finally:
        _recorders.recording.remove(exporter)


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
