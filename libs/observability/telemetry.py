"""OpenTelemetry: one trace from an HTTP request through every event it causes.

The W3C trace context of the span that appends an event travels in the event's envelope (and in
the NATS headers, for tools that look there); the projection runner starts the span that handles
the event as a child of it, so a signup and the license it leads to are one trace. Work that
outlives its consumer (a queued job, a scheduled decision) keeps the ``Cause`` it came from and
continues or links to its trace; a process started for a trace (a customer's instance) gets it
in ``TRACEPARENT``; outgoing HTTP calls carry it in their headers.

Each span names the service it was made for (``iotistic.service``): set from the service whose
task made it (``serving``), or by the service's routes. Its ``service.name`` is that service's
(``iotistic-signup``), also when every service runs in one process.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager

import httpx
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.environment_variables import OTEL_TRACES_SAMPLER
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    Span,
    SpanLimits,
    SpanProcessor,
    TracerProvider,
)
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from contracts import Cause, TraceContext

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()

SERVICE_ATTRIBUTE = "iotistic.service"
_SERVICE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "iotistic_service", default=None
)


def service_name(service: str) -> str:
    """The ``service.name`` of a service's spans: ``iotistic-<service>``."""
    return f"iotistic-{service}"


def serving(service: str) -> None:
    """Spans made from here on in this task (and the tasks it starts) are ``service``'s."""
    _SERVICE.set(service)


def name_request_span(service: str) -> None:
    """The current request's span, and those made while handling it, are ``service``'s (for
    one process serving every service's routes)."""
    serving(service)
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute(SERVICE_ATTRIBUTE, service)


# What an exception recorded on a span keeps: its type. Its message and stack trace may hold
# what no span should (a driver's error quoting a statement's values, a URL with a token).
KEPT_EXCEPTION_ATTRIBUTES = frozenset({"exception.type", "exception.escaped"})


def _without_error_text(event: Event) -> Event:
    if event.name != "exception" or not event.attributes:
        return event
    kept = {k: v for k, v in event.attributes.items() if k in KEPT_EXCEPTION_ATTRIBUTES}
    if len(kept) == len(event.attributes):
        return event
    return Event(event.name, kept, event.timestamp)


class _NamedByService(SpanProcessor):
    """Hands ``inner`` each span with the resource of the service that made it: the same
    resource with ``service.name`` set from the span's ``iotistic.service``."""

    def __init__(self, inner: SpanProcessor, resource: Resource) -> None:
        self._inner = inner
        self._resource = resource
        self._resources: dict[str, Resource] = {}

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        if SERVICE_ATTRIBUTE not in (span.attributes or {}):
            # The parent's service where the parent was made here, else the task's.
            parent = trace.get_current_span(parent_context)
            inherited = getattr(parent, "attributes", None) or {}
            service = inherited.get(SERVICE_ATTRIBUTE) or _SERVICE.get()
            if service is not None:
                span.set_attribute(SERVICE_ATTRIBUTE, service)
        self._inner.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        service = (span.attributes or {}).get(SERVICE_ATTRIBUTE)
        resource = span.resource
        if isinstance(service, str):
            resource = self._resources.get(service) or self._resource_of(service)
        events = tuple(_without_error_text(event) for event in span.events)
        if resource is span.resource and events == tuple(span.events):
            self._inner.on_end(span)
            return
        self._inner.on_end(
            ReadableSpan(
                name=span.name,
                context=span.context,
                parent=span.parent,
                resource=resource,
                attributes=span.attributes,
                events=events,
                links=span.links,
                kind=span.kind,
                status=span.status,
                start_time=span.start_time,
                end_time=span.end_time,
                instrumentation_scope=span.instrumentation_scope,
            )
        )

    def _resource_of(self, service: str) -> Resource:
        resource = self._resource.merge(Resource({"service.name": service_name(service)}))
        self._resources[service] = resource
        return resource

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def setup_tracing(
    service_name: str,
    exporter: str,
    extra_processors: tuple[SpanProcessor, ...] = (),
    attributes: Mapping[str, str] | None = None,
    sampler: Sampler | None = None,
) -> TracerProvider:
    """Install a tracer provider for this process and return it (to shut down at exit).

    ``exporter`` is ``none`` (spans are still made and propagated, just not sent), ``console``
    or ``otlp`` (configured by the standard ``OTEL_EXPORTER_OTLP_*`` variables).
    ``service_name`` names the spans no service claims (``serving``); ``attributes`` are added
    to the resource of every span; ``sampler`` replaces the default (every span recorded,
    or ``OTEL_TRACES_SAMPLER``'s choice).
    """
    resource = Resource.create({**(attributes or {}), "service.name": service_name})
    provider = TracerProvider(
        resource=resource, sampler=sampler or _sampler(), span_limits=span_limits()
    )
    processors: list[SpanProcessor] = []
    if exporter == "console":
        processors.append(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        processors.append(BatchSpanProcessor(OTLPSpanExporter()))
    for processor in (*processors, *extra_processors):
        provider.add_span_processor(_NamedByService(processor, resource))
    trace.set_tracer_provider(provider)
    return provider


EXIT_FLUSH_SECONDS = 3.0
"""How long a process's exit waits for its last spans to be sent. OTLP's exporter waits 10 s
for a collector that never answers (and backs off 1 + 2 + 4 s from one that refuses) per batch
of 512 spans: unbounded, an instance outlives the 10 s its backend gives it to stop, and is
killed; a control plane's pod its grace period."""


def shutdown_tracing(provider: TracerProvider, seconds: float = EXIT_FLUSH_SECONDS) -> bool:
    """Flush and stop ``provider`` at exit, waiting at most ``seconds``; whether it finished.

    Spans still unsent then are dropped: the flush goes on in a daemon thread, which the
    process's exit does not wait for.
    """
    stopping = threading.Thread(target=provider.shutdown, name="tracing shutdown", daemon=True)
    stopping.start()
    stopping.join(seconds)
    if stopping.is_alive():
        log.warning("spans not sent within %.0f s of exit were dropped", seconds)
        return False
    return True


# The longest attribute value a span keeps, unless OpenTelemetry's variables say otherwise: a
# client's path or user agent may be 16 KiB, copied to the collector for every request.
ATTRIBUTE_VALUE_MAX_CHARS = 2048
_LIMIT_VARIABLES = ("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT")


def span_limits(environ: Mapping[str, str] = os.environ) -> SpanLimits:
    """OpenTelemetry's limits, with attribute values cut at ``ATTRIBUTE_VALUE_MAX_CHARS``
    where no variable sets a length."""
    if any(environ.get(name) for name in _LIMIT_VARIABLES):
        return SpanLimits()
    return SpanLimits(max_attribute_length=ATTRIBUTE_VALUE_MAX_CHARS)


def _sampler() -> Sampler | None:
    """Every span is recorded, whatever a caller's ``traceparent`` says: its sampled flag is
    the client's to set, and an unsampled one would leave out the request and, through the
    events it appends, every span of the journey it starts (the job, the instance). An
    operator's ``OTEL_TRACES_SAMPLER`` decides instead (None: the SDK reads it)."""
    if os.environ.get(OTEL_TRACES_SAMPLER):
        return None
    return ParentBased(ALWAYS_ON, remote_parent_not_sampled=ALWAYS_ON)


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


def trace_context_of(carrier: Mapping[str, str]) -> TraceContext:
    """The W3C headers of ``carrier`` (``current_trace_context()``) as an envelope's."""
    return TraceContext(
        traceparent=carrier.get("traceparent"), tracestate=carrier.get("tracestate")
    )


def link_to(cause: Cause | TraceContext | None) -> list[trace.Link]:
    """A span link to the span a cause was appended in (none when it carried no trace): what
    a scheduled decision starts its own trace with, pointing at what it decided on."""
    context = cause.trace if isinstance(cause, Cause) else cause
    if context is None or not context.traceparent:
        return []
    span_context = trace.get_current_span(context_from(context)).get_span_context()
    return [trace.Link(span_context)] if span_context.is_valid else []


# --- across processes --------------------------------------------------------------------------

TRACEPARENT_VARIABLE = "TRACEPARENT"
TRACESTATE_VARIABLE = "TRACESTATE"


def trace_environment() -> dict[str, str]:
    """The current span's trace context as environment variables (``TRACEPARENT``,
    ``TRACESTATE``), for a process started on its behalf to continue its trace."""
    carrier = current_trace_context()
    names = {"traceparent": TRACEPARENT_VARIABLE, "tracestate": TRACESTATE_VARIABLE}
    return {names[key]: value for key, value in carrier.items() if key in names}


def context_from_environment(environ: Mapping[str, str] = os.environ) -> otel_context.Context:
    """The context a process was started in (``trace_environment``), else an empty one."""
    return context_from(
        {
            key: environ[variable]
            for key, variable in (
                ("traceparent", TRACEPARENT_VARIABLE),
                ("tracestate", TRACESTATE_VARIABLE),
            )
            if environ.get(variable)
        }
    )


async def inject_trace_headers(request: httpx.Request) -> None:
    """An httpx request hook: the call carries the current trace, so the service it reaches
    handles it in the same trace."""
    for key, value in current_trace_context().items():
        request.headers[key] = value


def traced_hooks() -> dict[str, list[Callable[[httpx.Request], Awaitable[None]]]]:
    """``event_hooks`` for an ``httpx.AsyncClient`` whose calls carry the current trace."""
    return {"request": [inject_trace_headers]}


@contextmanager
def continuing(cause: Cause | TraceContext | None) -> Iterator[otel_context.Context]:
    """Make the span a cause was appended in the current parent while the block runs."""
    context = cause.trace if isinstance(cause, Cause) else cause
    parent = context_from(context) if context is not None else otel_context.Context()
    token = otel_context.attach(parent)
    try:
        yield parent
    finally:
        otel_context.detach(token)
