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
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from contracts import Event
from libs.eventlog.errors import ConcurrencyConflict
from libs.eventlog.store import Appended, EventStore

log = logging.getLogger(__name__)


class ReadModelBehind(Exception):
    """The read model did not apply what the log holds in time: no decision can be made from
    it now; the scheduler ends its pass and decides on the next one."""


# How long one decision waits for its read model to apply what the log holds.
CATCH_UP_SECONDS = 5.0
# Tries at one decision in one pass; a customer whose events keep coming waits for the next.
ATTEMPTS = 4


async def append_decision(
    store: EventStore,
    *,
    customer_id: str,
    event_id: str,
    decide: Callable[[], Awaitable[Event | None]],
    consumers: Sequence[str],
    catch_up_seconds: float = CATCH_UP_SECONDS,
) -> Appended | None:
    """Append what ``decide`` answers (re-reading its read model) about ``customer_id``, only
    while nothing newer of the customer is on the log than ``consumers`` (the durable consumers
    feeding that read model) have applied; None when it decides nothing. Raises
    ``ReadModelBehind`` when the read model did not catch up (a parked event, a stalled
    consumer): no other decision from it can be trusted in this pass either.
    """
    expected = 0  # nothing known yet: the first try learns the customer's last sequence
    for _ in range(ATTEMPTS):
        event = await decide()
        if event is None:
            return None
        try:
            return await store.publish(
                event,
                customer_id=customer_id,
                event_id=event_id,
                expected_last_subject_seq=expected,
                expected_on=store.customer_filter(customer_id),
            )
        except ConcurrencyConflict as conflict:
            if conflict.last_seq is None:
                raise
            expected = conflict.last_seq
        if not await caught_up(store, consumers, catch_up_seconds):
            raise ReadModelBehind(f"{', '.join(consumers)} behind the log (customer {customer_id})")
    log.info("%s: events keep arriving; deciding on the next pass", customer_id)
    return None


@dataclass(frozen=True)
class Decision:
    """One decision a scheduler found due: about whom, the event id it appends under (derived
    from what is decided, so two passes append it once), and how to take it from the read
    model (None: not due any more)."""

    customer_id: str
    event_id: str
    decide: Callable[[], Awaitable[Event | None]]


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
            )
        except ReadModelBehind as behind:
            log.warning("%s: %s; the next pass decides", scheduler, behind)
            break
        appended += done is not None
    return appended


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
