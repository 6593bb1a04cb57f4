"""A transactional outbox: events decided inside a Postgres transaction reach the log as
committed, once.

A service whose own state is the truth for some decision (the deployment queue's leases and
job states) writes the state change and the events that record it in one transaction
(``add_to_outbox``). ``OutboxRelay`` appends them to the log in the order they were written,
one relay at a time across replicas, and deletes them once JetStream has acknowledged them.
A crash between the append and the delete appends again with the same event id, which
JetStream stores once. The table is ``outbox`` in the service's schema::

    CREATE TABLE outbox (
        id bigserial PRIMARY KEY,
        event_id text NOT NULL UNIQUE,
        subject_key text NOT NULL,
        envelope bytea NOT NULL
    );
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

from contracts import Cause, Envelope, Event, decode_envelope, encode_envelope
from libs.eventlog.store import EventStore, traced_envelope
from libs.runtime.scheduling import PASSING
from libs.runtime.service import ServiceRuntime
from libs.runtime.supervision import Worker, beat

log = logging.getLogger(__name__)

RELAY_BATCH = 200
# The longest wait between tries at an event the log will not take.
MAX_WAIT = 60.0
# A relay that has not emptied its outbox for this long is stuck: the events behind the one
# the log refuses wait, and readiness says so.
RELAY_STUCK_SECONDS = 120.0


async def add_to_outbox(
    conn: asyncpg.Connection,
    event: Event,
    *,
    customer_id: str | None,
    key: str | None = None,
    causation: Envelope | Cause | None = None,
    event_id: str | None = None,
) -> Envelope:
    """Record ``event`` for the log in the caller's transaction; returns its envelope. It
    carries the trace of the span recording it (else its cause's), whenever the relay sends
    it."""
    envelope = traced_envelope(
        event, customer_id=customer_id, causation=causation, event_id=event_id
    )
    subject_key = key or customer_id
    if subject_key is None:
        raise ValueError(f"{event.TYPE}: an event without a customer id needs a key")
    await conn.execute(
        "INSERT INTO outbox (event_id, subject_key, envelope) VALUES ($1, $2, $3) "
        "ON CONFLICT (event_id) DO NOTHING",
        envelope.event_id,
        subject_key,
        encode_envelope(envelope),
    )
    return envelope


class OutboxRelay:
    """Appends the outbox's events to the log in order; ``wake()`` after a commit for speed."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        store: Callable[[], EventStore],
        lock_key: str,
        poll_seconds: float = 0.5,
    ) -> None:
        """``lock_key`` names the advisory lock that keeps one relay at a time per service."""
        self._pool = pool
        self._store = store
        self._lock_key = lock_key
        self._poll = poll_seconds
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Relay now rather than at the next poll."""
        self._wake.set()

    async def relay_once(self) -> int:
        """Append what the outbox holds (a batch); returns how many were appended.

        If an append fails, the events appended before it are still deleted (committed)
        before the failure is raised, so that they are not appended again later.
        """
        store = self._store()
        appended: list[int] = []
        failure: Exception | None = None
        async with self._pool().acquire() as conn, conn.transaction():
            if not await conn.fetchval(
                "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))", self._lock_key
            ):
                return 0  # another replica relays
            # The deletes need no flush of their own: one lost in a crash only appends its
            # event again, seconds later, which JetStream stores once (the same event id).
            await conn.execute("SET LOCAL synchronous_commit = off")
            rows = await conn.fetch(
                "SELECT id, subject_key, envelope FROM outbox ORDER BY id LIMIT $1", RELAY_BATCH
            )
            try:
                for row in rows:
                    await store.append(decode_envelope(row["envelope"]), key=row["subject_key"])
                    appended.append(row["id"])
            except Exception as exc:  # noqa: BLE001 - raised again once the deletes commit
                failure = exc
            if appended:
                await conn.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[])", appended)
        if failure is not None:
            raise failure
        return len(appended)

    async def run(self) -> None:
        """Relay for ever: at once when woken, else every ``poll_seconds``; outages pass.

        Any other failure (an event the log refuses, a row that does not decode) is logged as
        an error at every try, with the wait growing to a minute, and the relay stays alive:
        the events behind it wait, in order, for an operator to mend or remove the row."""
        failures = 0
        while True:
            self._wake.clear()
            try:
                while await self.relay_once() == RELAY_BATCH:
                    pass
                failures = 0
                beat()  # the outbox is empty, or as far along as the log lets it be
            except PASSING as exc:
                log.warning("outbox relay (%s): %r; retrying", self._lock_key, exc)
            except Exception:
                failures += 1
                log.exception(
                    "outbox relay (%s): cannot append the oldest event; the events behind it "
                    "wait (try %d)",
                    self._lock_key,
                    failures,
                )
            wait = self._poll if failures == 0 else min(self._poll * 2**failures, MAX_WAIT)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)


def outbox_relay(runtime: ServiceRuntime) -> OutboxRelay:
    """The service's outbox relay (one per service runtime; its table is ``outbox``)."""
    return runtime.shared(
        "outbox relay", lambda: OutboxRelay(runtime.db, runtime.events, f"{runtime.name}:outbox")
    )


def outbox_worker(runtime: ServiceRuntime) -> Worker:
    """The supervised task that relays the service's outbox to the log; stuck (readiness
    503) when it has not emptied the outbox for ``RELAY_STUCK_SECONDS``."""
    return Worker("outbox relay", outbox_relay(runtime).run, stuck_after=RELAY_STUCK_SECONDS)
