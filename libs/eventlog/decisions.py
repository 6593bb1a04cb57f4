"""Decisions taken against the log, not against a read model that may lag it.

A scheduler finds what may be due in a read model (a trial that ended, a license about to
lapse), but the log may already hold an event that changes the answer and that the read model
has not applied yet (a subscription activated a moment ago). ``append_decision`` appends the
decision only if nothing about the customer reached the log since what the read model was known
to include: the append expects the customer's last sequence (all of their events, every type),
and a conflict says which sequence is the last. It then waits until the consumers behind the
read model have applied everything up to there, asks again, and appends with that sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace

from contracts import Cause, Envelope, Event
from libs.eventlog.errors import ConcurrencyConflict
from libs.eventlog.store import Appended, EventStore
from libs.observability.telemetry import link_to, tracer

log = logging.getLogger(__name__)


class ReadModelBehind(Exception):
    """The read model did not apply what the log holds in time: no decision can be made from
    it now; the scheduler ends its pass and decides on the next one."""


# How long one decision waits for its read model to apply what the log holds.
CATCH_UP_SECONDS = 5.0
# Tries at one decision in one pass; a customer whose events keep coming waits for the next.
ATTEMPTS = 4

TRACER = "iotistic.schedulers"


async def append_decision(
    store: EventStore,
    *,
    customer_id: str,
    event_id: str,
    decide: Callable[[], Awaitable[Event | None]],
    consumers: Sequence[str],
    cause: Cause | None = None,
    catch_up_seconds: float = CATCH_UP_SECONDS,
) -> Appended | None:
    """Append what ``decide`` answers (re-reading its read model) about ``customer_id``, only
    while nothing newer of the customer is on the log than ``consumers`` (the durable consumers
    feeding that read model) have applied; None when it decides nothing. Raises
    ``ReadModelBehind`` when the read model did not catch up (a parked event, a stalled
    consumer): no other decision from it can be trusted in this pass either.

    The event is appended caused by ``cause`` (none: it starts a chain of its own), in a root
    span ``schedule <EventType>`` linked to the cause's span; no span when nothing is due.
    """
    event = await decide()
    if event is None:
        return None
    with _scheduling(event, customer_id, event_id, cause) as span:
        expected = 0  # nothing known yet: the first try learns the customer's last sequence
        for attempt in range(ATTEMPTS):
            if attempt:
                event = await decide()
                if event is None:
                    span.set_attribute("iotistic.outcome", "not due")
                    return None
            try:
                appended = await store.publish(
                    event,
                    customer_id=customer_id,
                    causation=cause,
                    event_id=event_id,
                    expected_last_subject_seq=expected,
                    expected_on=store.customer_filter(customer_id),
                )
            except ConcurrencyConflict as conflict:
                if conflict.last_seq is None:
                    raise
                expected = conflict.last_seq
            else:
                span.set_attribute(
                    "iotistic.outcome", "duplicate" if appended.duplicate else "appended"
                )
                return appended
            if not await caught_up(store, consumers, catch_up_seconds):
                raise ReadModelBehind(
                    f"{', '.join(consumers)} behind the log (customer {customer_id})"
                )
        span.set_attribute("iotistic.outcome", "busy")
    log.info("%s: events keep arriving; deciding on the next pass", customer_id)
    return None


def _scheduling(
    event: Event, customer_id: str, event_id: str, cause: Cause | None
) -> contextlib.AbstractContextManager[trace.Span]:
    # A root span: an empty context has no parent, whatever span the caller is in.
    attributes: dict[str, str] = {
        "iotistic.customer_id": customer_id,
        "iotistic.event_id": event_id,
    }
    if cause is not None:
        attributes["iotistic.causation_id"] = cause.event_id
    return tracer(TRACER).start_as_current_span(
        f"schedule {event.TYPE}",
        context=otel_context.Context(),
        links=link_to(cause),
        attributes=attributes,
    )


@dataclass(frozen=True)
class Decision:
    """One decision a scheduler found due: about whom, the event id it appends under (derived
    from what is decided, so two passes append it once), how to take it from the read model
    (None: not due any more), and what it is decided on, when the read model remembers it."""

    customer_id: str
    event_id: str
    decide: Callable[[], Awaitable[Event | None]]
    cause: Cause | None = None


async def append_decisions(
    store: EventStore, decisions: Iterable[Decision], consumers: Sequence[str], scheduler: str
) -> int:
    """One scheduler pass: each decision through ``append_decision``, in order, until the read
    model is found behind the log (the rest wait for the next pass); how many were appended."""
    appended = 0
    for decision in decisions:
        try:
            done = await append_decision(
                store,
                customer_id=decision.customer_id,
                event_id=decision.event_id,
                decide=decision.decide,
                consumers=consumers,
                cause=decision.cause,
            )
        except ReadModelBehind as behind:
            log.warning("%s: %s; the next pass decides", scheduler, behind)
            break
        appended += done is not None
    return appended


def cause_json(envelope: Envelope) -> str:
    """What a read model keeps (a jsonb column) of the event a later decision is taken on:
    its ``Cause``, derived from the envelope alone, so a replay keeps the same."""
    return msgspec.json.encode(Cause.of(envelope)).decode()


def cause_from_json(raw: str | bytes | None, where: str = "read model") -> Cause | None:
    """The ``Cause`` a read model kept (``cause_json``); None for a row from before causes
    were kept, or one that does not read as a cause (logged: a decision is taken all the same,
    only without its causation)."""
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw, type=Cause)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
        log.warning("%s: a stored cause does not decode (%s); deciding without it", where, exc)
        return None


async def caught_up(store: EventStore, consumers: Sequence[str], within: float) -> bool:
    """Whether every consumer has applied all it has on the log now, within ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        pending = [await store.consumer_pending(durable) for durable in consumers]
        if not any(pending):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
