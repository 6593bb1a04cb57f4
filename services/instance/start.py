"""The instance's first start as one span, ``instance start``: from its app's start until it is
first ready, a child of the span that started the process (``TRACEPARENT``: the provisioner's
deploy step), so that a deploy's trace shows the instance coming up.

Its parts are child spans, ``start <part>`` (the database and its migrations, the license and
its JWKS fetch, the devices' broker clients); the broker connection is inside the span's time
(the instance is not ready without it). Only the first start: what the instance does once
ready (usage reports, sign-ins) is traced on its own, and a part restarted later by the
supervisor runs outside the span. A report the instance sends on its own (usage, quota
notices) is a trace of its own (``reporting``). No error message goes into a span (one could name a
database URL); the kind of error and what was not ready do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from contracts import TraceContext
from libs.observability.telemetry import context_from, tracer
from services.instance.settings import InstanceSettings

log = logging.getLogger(__name__)

TRACER = "iotistic.instance"
CUSTOMER_ATTRIBUTE = "iotistic.customer_id"
# Past this long without being ready, the span ends saying what was not (it would otherwise
# stay open, and unexported, for as long as the instance is broken).
START_BOUND_SECONDS = 300.0
POLL_MAX_SECONDS = 1.0

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


class FirstStart:
    """The span ``instance start``, open from ``begin`` until the instance is first ready."""

    def __init__(self, settings: InstanceSettings) -> None:
        """Nothing is started until ``begin``."""
        self._settings = settings
        self._span: trace.Span | None = None
        self._context = trace.set_span_in_context(trace.INVALID_SPAN)
        self.ended = True

    def begin(self) -> None:
        """Start the span, a child of the trace the process was started in (if any)."""
        s = self._settings
        self.ended = False
        parent = context_from(TraceContext(traceparent=s.traceparent, tracestate=s.tracestate))
        self._span = tracer(TRACER).start_span(
            "instance start",
            context=parent,
            attributes={CUSTOMER_ATTRIBUTE: s.instance_customer_id},
            record_exception=False,
        )
        self._context = trace.set_span_in_context(self._span, parent)

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Run a part of the first start as the child span ``start <name>`` (its calls to the
        control plane carry it); once the first start is over, as it is."""
        if self._span is None or self.ended:
            yield
            return
        with tracer(TRACER).start_as_current_span(
            f"start {name}",
            context=self._context,
            attributes={CUSTOMER_ATTRIBUTE: self._settings.instance_customer_id},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield
            except Exception as exc:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise

    async def until_ready(self, readiness: Readiness) -> None:
        """Poll ``readiness`` until it is first ready, then end the span; after
        ``START_BOUND_SECONDS`` end it as failed, naming the checks that were not ready."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_BOUND_SECONDS
        delay = 0.05
        try:
            while True:
                ok, detail = await readiness()
                if ok:
                    self.end()
                    return
                if loop.time() > deadline:
                    waiting = ", ".join(
                        name
                        for name, check in detail.items()
                        if isinstance(check, dict) and check.get("ok") is False
                    )
                    self.end(f"not ready after {START_BOUND_SECONDS:.0f}s: {waiting}")
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, POLL_MAX_SECONDS)
        except Exception as exc:  # noqa: BLE001 - ended as failed and logged, not swallowed
            log.warning("first start not followed to ready: %s", type(exc).__name__)
            self.end(f"readiness failed: {type(exc).__name__}")

    def end(self, error: str | None = None) -> None:
        """End the span (once), as failed with ``error`` if given."""
        if self._span is None or self.ended:
            return
        self.ended = True
        if error is not None:
            self._span.set_status(Status(StatusCode.ERROR, error))
        self._span.end()


@contextmanager
def reporting(what: str, settings: InstanceSettings) -> Iterator[None]:
    """A root span for a report the instance sends on its own (usage, quota notices): the
    control plane's handling of it joins that trace rather than start one."""
    with tracer(TRACER).start_as_current_span(
        what,
        context=otel_context.Context(),
        attributes={CUSTOMER_ATTRIBUTE: settings.instance_customer_id},
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield
        except Exception as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
