"""OpenTelemetry: one trace from an HTTP request through every event it causes.

The W3C trace context of the span that appends an event travels in the event's envelope (and in
the NATS headers, for tools that look there); the projection runner starts the span that handles
the event as a child of it, so a signup and the license it leads to are one trace.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from contracts import TraceContext

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()


def setup_tracing(
    service_name: str, exporter: str, extra_processors: tuple[SpanProcessor, ...] = ()
) -> TracerProvider:
    """Install a tracer provider for this process and return it (to shut down at exit).

    ``exporter`` is ``none`` (spans are still made and propagated, just not sent), ``console``
    or ``otlp`` (configured by the standard ``OTEL_EXPORTER_OTLP_*`` variables).
    """
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    for processor in extra_processors:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    return provider


def tracer(name: str) -> trace.Tracer:
    """A tracer from the installed provider (a no-op one until ``setup_tracing`` runs)."""
    return trace.get_tracer(name)


TRACESTATE_MAX_CHARS = 512
"""What W3C Trace Context asks every vendor to propagate; longer ones are not kept."""


def current_trace_context() -> dict[str, str]:
    """The active span's W3C trace headers (empty when no span is recording).

    A ``tracestate`` longer than W3C's 512 characters, which a client may send with any
    request, is dropped rather than copied into every event the request causes.
    """
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    if len(carrier.get("tracestate", "")) > TRACESTATE_MAX_CHARS:
        del carrier["tracestate"]
    return carrier


def context_from(trace_context: TraceContext | Mapping[str, str]) -> otel_context.Context:
    """An OpenTelemetry context whose parent is the span an event or request came from."""
    if isinstance(trace_context, TraceContext):
        carrier: dict[str, str] = {}
        if trace_context.traceparent:
            carrier["traceparent"] = trace_context.traceparent
        if trace_context.tracestate:
            carrier["tracestate"] = trace_context.tracestate
    else:
        carrier = dict(trace_context)
    return _PROPAGATOR.extract(carrier)
