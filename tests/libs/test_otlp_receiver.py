"""The test OTLP receiver decodes what OpenTelemetry's own OTLP/HTTP exporter sends, and each
span reaches it under the service.name of the service that made it."""

from __future__ import annotations

import contextvars

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from otlp_receiver import otlp_receiver

from libs.observability.telemetry import (
    ATTRIBUTE_VALUE_MAX_CHARS,
    _NamedByService,
    serving,
    span_limits,
)


def test_spans_arrive_decoded_with_their_services_name() -> None:
    # In a context of its own: ``serving`` must not name the spans of later tests.
    contextvars.copy_context().run(_spans_arrive_named)


def _spans_arrive_named() -> None:
    with otlp_receiver() as receiver:
        resource = Resource.create({"service.name": "iotistic-all"})
        provider = TracerProvider(resource=resource, span_limits=span_limits({}))
        exporter = OTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces")
        provider.add_span_processor(_NamedByService(SimpleSpanProcessor(exporter), resource))
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("unclaimed") as root:
            serving("billing")
            claimed = {"iotistic.service": "signup"}
            with (
                tracer.start_as_current_span("apply", attributes=claimed),
                tracer.start_as_current_span("inner"),
            ):
                pass
            with tracer.start_as_current_span("worker") as worker:
                worker.set_attribute("http.user_agent", "x" * 20_000)
                error = ValueError("password=hunter2 in a driver's message")
                worker.record_exception(error)
        provider.shutdown()
        spans = {s.name: s for s in receiver.spans()}
    assert spans["unclaimed"].service_name == "iotistic-all"
    assert spans["apply"].service_name == "iotistic-signup"
    assert spans["inner"].service_name == "iotistic-signup"  # its parent's service
    assert spans["worker"].service_name == "iotistic-billing"  # its task's
    trace_id = f"{root.get_span_context().trace_id:032x}"
    assert {s.trace_id for s in spans.values()} == {trace_id}
    assert spans["inner"].parent_span_id == spans["apply"].span_id
    # A client's huge value is cut; an exception keeps its type, not its message or stack.
    assert len(spans["worker"].attributes["http.user_agent"]) == ATTRIBUTE_VALUE_MAX_CHARS
    [(event, recorded)] = spans["worker"].events
    assert event == "exception" and recorded["exception.type"] == "ValueError"
    assert "hunter2" not in repr(recorded), recorded
