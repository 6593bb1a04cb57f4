"""Applying one event to a read model, together with its checkpoint, in one transaction.

A ``Projection`` is a read model: its tables and a table of handlers, one per event type it
reads. ``apply_stored`` applies one message from the log and moves the projection's checkpoint
(the last stream sequence applied) in the same transaction, so a redelivered event finds the
checkpoint past it and changes nothing: delivery at least once gives read models as if each
event were applied exactly once. An event that cannot be applied raises ``PoisonEvent``, for the
runner to retry or park; a connection that fails raises one of ``TRANSIENT_ERRORS``, for it to
try the same event again.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import asyncpg

from contracts import Envelope, Event, MalformedEvent, decode_envelope, decode_event
from libs.db.postgres import CONNECTION_ERRORS
from libs.eventlog.connection import NATS_ERRORS
from libs.eventlog.errors import EventStoreError
from libs.eventlog.reader import StoredMessage
from libs.projections.checkpoints import lock_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)

# Failures that say nothing about the event: the database or the log is away for a moment.
# The runner reconnects and tries the same event again; it is never parked for these.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    *NATS_ERRORS,
    EventStoreError,
)


@dataclass(frozen=True)
class Recorded(Generic[E]):
    """An event as the log recorded it: its position, its envelope and its decoded body."""

    seq: int
    envelope: Envelope
    event: E


EventHandler = Callable[[asyncpg.Connection, Recorded[Any]], Awaitable[None]]


@dataclass(frozen=True)
class Projection:
    """A read model: the tables it owns and the function that applies each event type to them.

    Handlers must derive every value from the event (use ``envelope.occurred_at``, never
    ``now()``), so that a replay builds exactly the rows the live projection built.
    """

    name: str
    handlers: Mapping[type[Event], EventHandler]
    tables: tuple[str, ...]
    # Called after each transaction of this consumer commits (a reactor wakes the relay of
    # the outbox its handlers wrote to, so the effects reach the log at once).
    after_commit: Callable[[], None] | None = None

    @property
    def event_types(self) -> list[str]:
        """Names of the event types this projection reads."""
        return sorted(cls.TYPE for cls in self.handlers)

    def handler_for(self, event_type: str) -> EventHandler | None:
        """The handler for an event type, if this projection reads it."""
        for cls, handler in self.handlers.items():
            if event_type == cls.TYPE:
                return handler
        return None


async def update_row(
    conn: asyncpg.Connection,
    table: str,
    key_column: str,
    key: object,
    assignments: str,
    *values: object,
) -> None:
    """``UPDATE table SET assignments WHERE key_column = $1``; ``values`` are ``$2`` onwards.

    A handler's common move: events about a row the projection does not have change nothing.
    """
    await conn.execute(f"UPDATE {table} SET {assignments} WHERE {key_column} = $1", key, *values)


async def update_customer_row(
    conn: asyncpg.Connection, table: str, r: Recorded[Any], assignments: str, *values: object
) -> None:
    """Update the event's customer's row in ``table``, stamping ``updated_at`` with the event's
    time (``$2``); ``values`` are ``$3`` onwards."""
    await update_row(
        conn,
        table,
        "customer_id",
        r.envelope.customer_id,
        f"{assignments}, updated_at = $2",
        r.envelope.occurred_at,
        *values,
    )


class ApplyOutcome(enum.Enum):
    """What applying one stored message did."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"
    # Its envelope names another type than its subject: see ``apply_event``.
    REFUSED = "refused"


class PoisonEvent(Exception):
    """An event that a projection cannot apply: malformed, unknown, or its handler fails."""

    def __init__(self, seq: int, reason: str, *, retryable: bool) -> None:
        super().__init__(f"seq {seq}: {reason}")
        self.seq = seq
        self.reason = reason
        self.retryable = retryable


def decode_stored(stored: StoredMessage) -> Recorded[Event]:
    """Decode a stored message, raising ``PoisonEvent`` if it is not a valid event."""
    try:
        envelope = decode_envelope(stored.data)
        event = decode_event(envelope)
    except MalformedEvent as exc:
        raise PoisonEvent(stored.seq, f"malformed event: {exc}", retryable=False) from exc
    return Recorded(seq=stored.seq, envelope=envelope, event=event)


async def apply_stored(
    conn: asyncpg.Connection,
    projection: Projection,
    stored: StoredMessage,
    epoch: int | None = None,
) -> ApplyOutcome:
    """Apply one message and advance the checkpoint atomically.

    On a connection outside a transaction it makes one of its own. Inside the caller's (a batch
    applied with one commit), a failure leaves that transaction for the caller to roll back.
    Raises ``PoisonEvent`` for a message that cannot be applied; connection errors propagate
    unchanged for the caller to retry.
    """
    if conn.is_in_transaction():
        return await _apply(conn, projection, stored, epoch)
    async with conn.transaction():
        return await _apply(conn, projection, stored, epoch)


async def _apply(
    conn: asyncpg.Connection, projection: Projection, stored: StoredMessage, epoch: int | None
) -> ApplyOutcome:
    last = await lock_checkpoint(conn, projection.name, epoch)
    outcome = await apply_event(conn, projection, stored, last)
    if outcome is not ApplyOutcome.DUPLICATE:
        await save_checkpoint(conn, projection.name, stored.seq)
    return outcome


async def apply_event(
    conn: asyncpg.Connection, projection: Projection, stored: StoredMessage, last: int
) -> ApplyOutcome:
    """Apply one event given the checkpoint ``last``; the caller saves the checkpoint."""
    if stored.seq <= last:
        return ApplyOutcome.DUPLICATE
    recorded = decode_stored(stored)
    if recorded.envelope.type != stored.event_type:
        # The bus vouches only for the subject: it let the subject's owner append, and an
        # envelope claiming another type is that owner forging another service's event. Not
        # applied, never parked (a compromised service must not stall everyone's projections),
        # counted and logged; the same on every replay, so read models stay reproducible.
        log.error(
            "%s: seq %d on %s claims to be %s; refused: only %s's owner could append there",
            projection.name,
            stored.seq,
            stored.subject,
            recorded.envelope.type[:64],
            stored.event_type,
        )
        return ApplyOutcome.REFUSED
    handler = projection.handler_for(recorded.envelope.type)
    if handler is None:
        return ApplyOutcome.IGNORED
    try:
        await handler(conn, recorded)
    except TRANSIENT_ERRORS:
        raise
    # Any other failure of a handler is this event's problem, not the connection's:
    # it is parked (with its reason), never dropped.
    except Exception as exc:
        raise PoisonEvent(stored.seq, f"{type(exc).__name__}: {exc}", retryable=True) from exc
    return ApplyOutcome.APPLIED
