"""The test OTLP receiver decodes what OpenTelemetry's own OTLP/HTTP exporter sends, and each
span reaches it under the service.name of the service that made it."""

from __future__ import annotations

import contextvars

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from otlp_receiver import otlp_receiver

from libs.observability.telemetry import _NamedByService, serving


def test_spans_arrive_decoded_with_their_services_name() -> None:
    # In a context of its own: ``serving`` must not name the spans of later tests.
    contextvars.copy_context().run(_spans_arrive_named)


def _spans_arrive_named() -> None:
    with otlp_receiver() as receiver:
        resource = Resource.create({"service.name": "iotistic-all"})
        provider = TracerProvider(resource=resource)
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
            with tracer.start_as_current_span("worker"):
                pass
        provider.shutdown()
        spans = {s.name: s for s in receiver.spans()}
    assert spans["unclaimed"].service_name == "iotistic-all"
    assert spans["apply"].service_name == "iotistic-signup"
    assert spans["inner"].service_name == "iotistic-signup"  # its parent's service
    assert spans["worker"].service_name == "iotistic-billing"  # its task's
    trace_id = f"{root.get_span_context().trace_id:032x}"
    assert {s.trace_id for s in spans.values()} == {trace_id}
    assert spans["inner"].parent_span_id == spans["apply"].span_id
