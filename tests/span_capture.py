"""Every span this test process finishes, in memory.

OpenTelemetry lets a process install its tracer provider once (a second ``setup_tracing`` is
ignored with a warning), so the test modules that read spans share the one installed here
on first use, each clearing what earlier modules left.
"""

from __future__ import annotations

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from libs.observability.telemetry import setup_tracing

_exporter: InMemorySpanExporter | None = None


def captured_spans() -> InMemorySpanExporter:
    """The exporter of the process's tracer provider (installed now if it is not yet),
    emptied: it holds the spans finished from here on."""
    global _exporter
    if _exporter is None:
        _exporter = InMemorySpanExporter()
        setup_tracing("iotistic-test", "none", (SimpleSpanProcessor(_exporter),))
    _exporter.clear()
    return _exporter
