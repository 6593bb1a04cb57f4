"""The spans of a job: one per attempt (``job <kind>``), continuing the trace of what asked
for the job, and one per step the backend reports (``step <name>``), children of it.

A step's span is the current span from the moment the backend reports the step until it
reports the next one or the attempt ends, so what the backend does in the step (start the
instance's process, ask it whether it is ready) is inside it: the instance started gets the
step's trace in ``TRACEPARENT``, and HTTP calls carry it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import Token

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from libs.observability.telemetry import SERVICE_ATTRIBUTE, context_from, tracer
from services.provisioner.leases import Claimed

TRACER = "iotistic.provisioner"


@contextmanager
def job_span(job: Claimed, backend: str) -> Iterator[Span]:
    """The current span while one attempt at ``job`` runs: a child of the span its cause was
    recorded in (a root span for a job queued before causes were kept). The caller sets its
    status; an exception escaping it marks it failed unless it is a cancellation (a worker
    shutting down gives the job back: nothing failed)."""
    parent = context_from(job.cause.trace) if job.cause is not None else otel_context.Context()
    with tracer(TRACER).start_as_current_span(
        f"job {job.kind}",
        context=parent,
        attributes={
            SERVICE_ATTRIBUTE: "provisioner",
            "iotistic.customer_id": job.customer_id,
            "iotistic.job_id": job.job_id,
            "iotistic.attempt": job.attempt,
            "iotistic.backend": backend,
        },
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            fail(span, f"internal error: {type(exc).__name__}", exc)
            raise


def fail(span: Span, error: str, exc: BaseException | None = None) -> None:
    """Mark ``span`` failed with ``error``: what the job records, never a secret. Of ``exc``
    only the type is kept: its message, and those of the errors it was raised from (a driver's,
    an HTTP client's), may hold what no span should."""
    if exc is not None:
        span.set_attribute("exception.type", type(exc).__qualname__)
    span.set_status(Status(StatusCode.ERROR, error))


class JobSteps:
    """The step spans of one attempt, opened as the backend reports its steps.

    ``enter`` and ``close`` must be called in the task that runs the attempt: the step's span
    is made current there (a step reported from another task gets its span, not made current).
    """

    def __init__(self) -> None:
        self._task = asyncio.current_task()
        self._name: str | None = None
        self._span: Span | None = None
        self._token: Token[otel_context.Context] | None = None

    def enter(self, step: str) -> None:
        """The backend reports ``step``: the previous step's span ends and this one's starts
        (nothing changes while the backend reports progress within the same step)."""
        if step == self._name:
            return
        self.close()
        self._name = step
        self._span = tracer(TRACER).start_span(f"step {step}")
        if asyncio.current_task() is self._task:
            self._token = otel_context.attach(trace.set_span_in_context(self._span))

    def fail(self, error: str) -> None:
        """The attempt failed in the current step: its span says so too."""
        if self._span is not None:
            fail(self._span, error)

    def close(self) -> None:
        """End the current step's span (the attempt ended, or the next step begins)."""
        if self._token is not None:
            otel_context.detach(self._token)
            self._token = None
        if self._span is not None:
            self._span.end()
            self._span = None
        self._name = None
