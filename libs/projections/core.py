"""Projections: read models kept in step with the log, one durable consumer each.

Every event is applied in one Postgres transaction together with the projection's checkpoint
(the last stream sequence applied), and acknowledged to JetStream only after that commit. A
redelivered event finds the checkpoint already past it and changes nothing, so delivery at least
once gives read models as if each event were applied exactly once.

Order matters to a read model, so one process at a time consumes a projection (a Postgres
advisory lock; other replicas wait on standby) and an event that cannot be applied is parked and
stops the projection where it is: it moves on only when an operator decides (`iotistic parked
skip|retry`). The service keeps serving what it has meanwhile; readiness and metrics show it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

import asyncpg
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api
from opentelemetry import trace

from contracts import Envelope, Event, MalformedEvent, decode_envelope, decode_event
from libs.db.postgres import CONNECTION_ERRORS
from libs.eventlog.store import EventStore, EventStoreError, StoredMessage, to_stored
from libs.observability.metrics import ProjectionMetrics
from libs.observability.telemetry import context_from, tracer

log = logging.getLogger(__name__)

E = TypeVar("E", bound=Event)

NATS_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.Error,
    nats.js.errors.Error,
    OSError,
    TimeoutError,
)

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


async def ensure_checkpoint(conn: asyncpg.Connection, projection: str) -> int:
    """The projection's checkpoint, creating it at 0 the first time."""
    await conn.execute(
        "INSERT INTO projection_checkpoints (projection) VALUES ($1) ON CONFLICT DO NOTHING",
        projection,
    )
    value = await conn.fetchval(
        "SELECT last_seq FROM projection_checkpoints WHERE projection = $1", projection
    )
    return int(value)


class LogMismatch(Exception):
    """The log is not the one the projection has read: it was created again, or it ends before
    the checkpoint. Consuming would take its events for ones already applied."""


async def check_stream(
    conn: asyncpg.Connection,
    projection: str,
    checkpoint: int,
    created: datetime | None,
    last_seq: int,
) -> None:
    """Raise ``LogMismatch`` unless the stream is the one this projection has read so far; a
    projection that has read nothing (or predates the record) adopts the current stream."""
    seen = await conn.fetchval(
        "SELECT stream_created FROM projection_checkpoints WHERE projection = $1", projection
    )
    if created is not None and (seen is None or checkpoint == 0):
        await conn.execute(
            "UPDATE projection_checkpoints SET stream_created = $2 WHERE projection = $1",
            projection,
            created,
        )
    elif created is not None and seen != created:
        raise LogMismatch(
            f"the event stream was created again ({created.isoformat()}; this projection read "
            f"the one created {seen.isoformat()}, up to seq {checkpoint}): restore the stream, "
            "or rebuild the read models from the new one with `iotistic replay`"
        )
    if checkpoint > last_seq:
        raise LogMismatch(
            f"the event stream ends at seq {last_seq} but this projection has applied events "
            f"up to seq {checkpoint}: events were lost from the log; restore it, or rebuild the "
            "read models with `iotistic replay`"
        )


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


class LostLeadership(Exception):
    """Another replica has taken the projection since this one did: it must not write."""


async def lock_checkpoint(
    conn: asyncpg.Connection, projection: str, epoch: int | None = None
) -> int:
    """The checkpoint, locked until the transaction ends (one applier at a time). With
    ``epoch``, raise ``LostLeadership`` unless it is still the projection's."""
    row = await conn.fetchrow(
        "SELECT last_seq, epoch FROM projection_checkpoints WHERE projection = $1 FOR UPDATE",
        projection,
    )
    if row is None:
        raise RuntimeError(f"projection {projection} has no checkpoint row")
    if epoch is not None and row["epoch"] != epoch:
        raise LostLeadership(
            f"projection {projection} was taken by another replica (epoch {row['epoch']}, "
            f"this one had {epoch})"
        )
    return int(row["last_seq"])


async def take_leadership(conn: asyncpg.Connection, projection: str) -> int:
    """Count the projection's epoch up for a replica that now holds its lock; the new epoch."""
    return int(
        await conn.fetchval(
            "UPDATE projection_checkpoints SET epoch = epoch + 1 WHERE projection = $1 "
            "RETURNING epoch",
            projection,
        )
    )


async def save_checkpoint(conn: asyncpg.Connection, projection: str, seq: int) -> None:
    """Move the checkpoint, in the transaction that applied the events up to ``seq``."""
    await conn.execute(
        "UPDATE projection_checkpoints SET last_seq = $2, updated_at = now() WHERE projection = $1",
        projection,
        seq,
    )


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


class _Reattach(Exception):
    """The consumer is out of step with the checkpoint: bind again, recreating it from there."""


def durable_name(service: str, consumer: str) -> str:
    """The JetStream durable consumer of one projection or reactor of a service; the bus lets
    each service use only the consumers named so after its own (``libs/eventlog/bus_auth.py``)."""
    return f"{service}_{consumer}"


class RunnerState(enum.Enum):
    """Where a projection runner is; shown by readiness."""

    STARTING = "starting"
    STANDBY = "standby"
    RUNNING = "running"
    BLOCKED = "blocked"
    DISCONNECTED = "disconnected"
    STOPPED = "stopped"


@dataclass
class RunnerStatus:
    """A snapshot of a runner for health checks and the operator."""

    state: RunnerState = RunnerState.STARTING
    checkpoint: int = 0
    blocked_at: int | None = None
    last_error: str | None = None
    attached: bool = False


@dataclass(frozen=True)
class RunnerConfig:
    """How a runner consumes: batch size, ack wait, attempts before parking."""

    batch_size: int = 100
    ack_wait_seconds: float = 30.0
    max_attempts: int = 3
    decision_poll_seconds: float = 1.0
    reconnect_delay_seconds: float = 1.0


@dataclass
class ProjectionRunner:
    """Consumes the log for one projection of one service and keeps its checkpoint."""

    service: str
    projection: Projection
    pool: asyncpg.Pool
    dsn: str
    schema: str
    store: EventStore
    metrics: ProjectionMetrics
    config: RunnerConfig = field(default_factory=RunnerConfig)
    status: RunnerStatus = field(default_factory=RunnerStatus)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _lock_conn: asyncpg.Connection | None = None
    _was_attached: bool = False
    _recreate_consumer: bool = False
    _epoch: int | None = None

    @property
    def durable(self) -> str:
        """The JetStream durable consumer name: ``<service>_<projection>``."""
        return durable_name(self.service, self.projection.name)

    @property
    def lock_key(self) -> str:
        """The advisory-lock key that makes one process at a time the consumer."""
        return f"projection:{self.schema}.{self.projection.name}"

    def stop(self) -> None:
        """Ask the runner to finish the event in hand and return from ``run``."""
        self._stopping.set()

    async def run(self) -> None:
        """Consume until stopped, riding out lost connections to Postgres or NATS."""
        base = self.config.reconnect_delay_seconds
        delay = base
        while not self._stopping.is_set():
            try:
                await self._lead_and_consume()
                delay = base  # on standby, or stopped: poll for the lock at the base pace
            except TRANSIENT_ERRORS as exc:
                self.status.state = RunnerState.DISCONNECTED
                self.status.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("%s: %r; retrying in %.1fs", self.durable, exc, delay)
                delay = min(delay * 2, 10.0) if not self._was_attached else base
            except LostLeadership as exc:
                # Another replica leads now (this one's lock went without it noticing): stand
                # by; nothing of this one's was written after the other took over.
                log.warning("%s: %s; standing by", self.durable, exc)
                self.status.state = RunnerState.STANDBY
                delay = base
            except LogMismatch as exc:
                # Nothing is consumed until an operator restores the log or rebuilds; looked
                # at again now and then, so a restored stream is taken up by itself.
                if self.status.state is not RunnerState.BLOCKED:
                    log.error("%s: stopped: %s", self.durable, exc)
                self.status.state = RunnerState.BLOCKED
                self.status.last_error = str(exc)
                delay = min(max(delay, base) * 2, 30.0)
            finally:
                self.status.attached = False
                self._was_attached = False
                await self._release_lock()
            await self._sleep(delay)
        self.status.state = RunnerState.STOPPED

    async def _lead_and_consume(self) -> None:
        if not await self._acquire_lock():
            return
        while not self._stopping.is_set():
            try:
                await self._attach_and_consume()
                return
            except _Reattach as why:
                log.warning("%s: %s; re-attaching from the checkpoint", self.durable, why)
                self._recreate_consumer = True

    async def _attach_and_consume(self) -> None:
        created, last_seq = await self.store.identity()
        async with self.pool.acquire() as conn:
            self.status.checkpoint = await ensure_checkpoint(conn, self.projection.name)
            await check_stream(
                conn, self.projection.name, self.status.checkpoint, created, last_seq
            )
            self._epoch = await take_leadership(conn, self.projection.name)
        sub, delivered = await self._attach(self.status.checkpoint)
        self.status.attached = True
        self._was_attached = True
        self.status.state = RunnerState.RUNNING
        self.status.last_error = None
        try:
            await self._consume(sub, delivered)
        finally:
            self.status.attached = False
            try:
                await sub.unsubscribe()
            except NATS_ERRORS:
                log.debug("%s: unsubscribe failed", self.durable, exc_info=True)

    async def _acquire_lock(self) -> bool:
        self._lock_conn = await asyncpg.connect(self.dsn)
        got = await self._lock_conn.fetchval(
            "SELECT pg_try_advisory_lock(hashtextextended($1, 0))", self.lock_key
        )
        if got:
            log.info("%s: consuming from checkpoint", self.durable)
            return True
        if self.status.state is not RunnerState.STANDBY:
            log.info("%s: standby, another process consumes this projection", self.durable)
        self.status.state = RunnerState.STANDBY
        return False

    async def _release_lock(self) -> None:
        conn, self._lock_conn = self._lock_conn, None
        if conn is None or conn.is_closed():
            return
        try:
            await conn.close(timeout=2)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError):
            conn.terminate()

    async def _still_leader(self) -> None:
        """Raise if the lock's connection died: another replica may be leader now."""
        if self._lock_conn is None or self._lock_conn.is_closed():
            raise ConnectionError("lost the projection lock's connection")
        await self._lock_conn.fetchval("SELECT 1", timeout=5)

    def consumer_config(self, start_after: int) -> api.ConsumerConfig:
        """The durable consumer for this projection, starting after ``start_after``."""
        deliver = api.DeliverPolicy.ALL if start_after == 0 else api.DeliverPolicy.BY_START_SEQUENCE
        return api.ConsumerConfig(
            durable_name=self.durable,
            name=self.durable,
            description=f"{self.service} projection {self.projection.name}",
            deliver_policy=deliver,
            opt_start_seq=start_after + 1 if start_after else None,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.config.ack_wait_seconds,
            max_deliver=-1,
            max_ack_pending=self.config.batch_size * 2,
            filter_subjects=self.store.filter_for(self.projection.event_types),
        )

    async def _attach(self, checkpoint: int) -> tuple[Any, int]:
        """Bind to the durable consumer, recreating it if it would skip or stall events.

        The checkpoint in Postgres is the truth. A consumer that has delivered past it, or has
        events in flight or pull requests waiting (left by a process that died), or whose
        checkpoint was reset by a replay, or that fell out of step with this runner, is
        recreated from the checkpoint: nothing waits for an ack timeout and nothing is skipped.
        A consumer behind the checkpoint with nothing in flight is kept: what it delivers again
        is recognised as already applied. Returns the subscription and the consumer sequence
        of the last delivery so far, which the next delivery must follow.
        """
        js = self.store.js
        wanted = self.consumer_config(checkpoint)
        try:
            info = await js.consumer_info(self.store.stream, self.durable)
            filters = sorted(info.config.filter_subjects or [info.config.filter_subject or ""])
            keep = (
                not self._recreate_consumer
                and filters == sorted(wanted.filter_subjects or [])
                and info.config.ack_wait == wanted.ack_wait
                and info.delivered.stream_seq <= checkpoint
                # Nobody else consumes while we hold the lock: anything in flight or any pull
                # request waiting belongs to a process that died. Left alone, its unacked
                # events would hold up to max_ack_pending events back for a whole ack_wait.
                and not info.num_ack_pending
                and not info.num_waiting
            )
            log.info(
                "%s: consumer delivered %d, acked %d, %d pending; checkpoint %d",
                self.durable,
                info.delivered.stream_seq,
                info.ack_floor.stream_seq,
                info.num_ack_pending,
                checkpoint,
            )
            delivered = int((info.delivered.consumer_seq or 0) if info.delivered else 0)
            if not keep:
                log.info("%s: recreating consumer from seq %d", self.durable, checkpoint + 1)
                await js.delete_consumer(self.store.stream, self.durable)
                await js.add_consumer(self.store.stream, wanted)
                delivered = 0
        except nats.js.errors.NotFoundError:
            await js.add_consumer(self.store.stream, wanted)
            delivered = 0
        self._recreate_consumer = False
        sub = await js.pull_subscribe_bind(durable=self.durable, stream=self.store.stream)
        return sub, delivered

    async def _consume(self, sub: Any, delivered: int) -> None:
        """Apply what the consumer delivers, in the order of its delivery sequence.

        "At or below the checkpoint means applied" holds only while no delivery is missing: a
        delivery lost in a reconnect waits for its ack timeout while later ones arrive. So, as
        NATS's ordered consumers do, every delivery must follow the last one (``delivered``);
        at a gap nothing more is applied and ``_Reattach`` is raised.
        """
        last_lock_check = time.monotonic()
        idle = True
        while not self._stopping.is_set():
            if time.monotonic() - last_lock_check > 5:
                await self._still_leader()
                last_lock_check = time.monotonic()
            msgs = await self._next_batch(sub, idle)
            idle = not msgs
            in_step = deliveries_in_step(msgs, delivered)
            if in_step:
                delivered = int(msgs[in_step - 1].metadata.sequence.consumer)
                await self._apply_batch(msgs[:in_step])
            if in_step < len(msgs):
                got = msgs[in_step].metadata.sequence
                raise _Reattach(
                    f"delivery {delivered + 1} is missing (got {got.consumer}, seq {got.stream})"
                )

    async def _apply_batch(self, msgs: Sequence[Msg]) -> None:
        if await self._apply_together(msgs):
            return
        for index, msg in enumerate(msgs):
            try:
                await self._handle(msg)
            except PoisonEvent as poison:
                await self._nak_all(msgs[index:])
                await self._wait_for_decision(poison)
                # A nak is never confirmed: one lost on the way leaves these events waiting
                # for their ack timeout while later ones are delivered without a gap in the
                # delivery sequence. Starting again from the checkpoint cannot skip them.
                raise _Reattach(f"the parked event at seq {poison.seq} was decided") from None
            except BaseException:
                if not await self._nak_all(msgs[index:]):
                    self._recreate_consumer = True
                raise

    async def _next_batch(self, sub: Any, idle: bool) -> list[Msg]:
        """Wait for the next event when idle; take what is there, up to a batch, when busy.

        nats-py's fetch of a batch waits until the batch is full or its timeout ends, so
        asking for a batch while idle would hold a lone event back for up to a second.
        """
        try:
            if idle:
                msgs: list[Msg] = await sub.fetch(1, timeout=1.0)
            else:
                msgs = await sub.fetch(self.config.batch_size, timeout=0.05)
        except (nats.errors.TimeoutError, TimeoutError):
            return []
        return msgs

    async def _apply_together(self, msgs: Sequence[Msg]) -> bool:
        """Apply a batch in one transaction: one commit (one WAL flush) instead of one each.

        Returns False, keeping nothing, if any event of it fails; the batch is then applied
        one event at a time, which finds the event to retry or park.
        """
        if len(msgs) < 2:
            return False
        batch = [to_stored(m) for m in msgs]
        outcomes: list[ApplyOutcome] = []
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                # The checkpoint is read and written once for the whole batch.
                last = await lock_checkpoint(conn, self.projection.name, self._epoch)
                for stored in batch:
                    outcome = await self._apply_traced(conn, stored, last)
                    if outcome is not ApplyOutcome.DUPLICATE:
                        last = stored.seq
                    outcomes.append(outcome)
                await save_checkpoint(conn, self.projection.name, last)
        except PoisonEvent:
            return False
        self._committed()
        for msg, stored, outcome in zip(msgs, batch, outcomes, strict=True):
            await msg.ack()
            self.metrics.record(self.service, self.projection.name, outcome.value, stored.seq)
        self.status.checkpoint = max(self.status.checkpoint, batch[-1].seq)
        return True

    async def _handle(self, msg: Msg) -> None:
        stored = to_stored(msg)
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self.pool.acquire() as conn:
                    outcome = await self._apply_traced(conn, stored)
            except PoisonEvent as poison:
                if poison.retryable and attempt < self.config.max_attempts:
                    log.warning("%s: attempt %d failed: %s", self.durable, attempt, poison)
                    await self._sleep(0.2 * 2**attempt)
                    continue
                await self._park(stored, poison, attempt)
                raise
            break
        self._committed()
        await msg.ack()
        self.status.checkpoint = max(self.status.checkpoint, stored.seq)
        self.metrics.record(self.service, self.projection.name, outcome.value, stored.seq)

    def _committed(self) -> None:
        if self.projection.after_commit is not None:
            self.projection.after_commit()

    async def _apply_traced(
        self, conn: asyncpg.Connection, stored: StoredMessage, last: int | None = None
    ) -> ApplyOutcome:
        parent = context_from(
            {k: v for k, v in stored.headers.items() if k in ("traceparent", "tracestate")}
        )
        event_type = stored.event_type
        with tracer("iotistic.projections").start_as_current_span(
            f"apply {event_type}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "iotistic.service": self.service,
                "iotistic.projection": self.projection.name,
                "messaging.system": "nats",
                "messaging.destination.name": stored.subject,
                "messaging.message.id": stored.headers.get("Nats-Msg-Id", ""),
                "iotistic.stream_seq": stored.seq,
            },
        ) as span:
            started = time.perf_counter()
            if last is None:
                outcome = await apply_stored(conn, self.projection, stored, self._epoch)
            else:
                outcome = await apply_event(conn, self.projection, stored, last)
            self.metrics.observe_apply(
                self.service, self.projection.name, time.perf_counter() - started
            )
            span.set_attribute("iotistic.outcome", outcome.value)
            return outcome

    async def _park(self, stored: StoredMessage, poison: PoisonEvent, attempts: int) -> None:
        log.error("%s: parked event seq %d: %s", self.durable, stored.seq, poison.reason)
        async with self.pool.acquire() as conn:
            await conn.execute(
                """
                INSERT INTO parked_events
                    (projection, seq, subject, event_type, event_id, payload, error, attempts)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                ON CONFLICT (projection, seq) DO UPDATE SET
                    error = EXCLUDED.error,
                    attempts = parked_events.attempts + EXCLUDED.attempts,
                    parked_at = now(),
                    -- a decision taken while no runner was waiting still stands
                    decision = CASE WHEN parked_events.resolved_at IS NULL
                                    THEN parked_events.decision END,
                    decided_at = CASE WHEN parked_events.resolved_at IS NULL
                                      THEN parked_events.decided_at END,
                    resolved_at = NULL
                """,
                self.projection.name,
                stored.seq,
                stored.subject,
                stored.event_type,
                stored.headers.get("Nats-Msg-Id"),
                stored.data,
                poison.reason,
                attempts,
            )
        self.metrics.parked(self.service, self.projection.name)
        self.status.state = RunnerState.BLOCKED
        self.status.blocked_at = stored.seq
        self.status.last_error = poison.reason

    async def _wait_for_decision(self, poison: PoisonEvent) -> None:
        """Hold the projection at the parked event until an operator skips or retries it."""
        while not self._stopping.is_set():
            await self._still_leader()
            async with self.pool.acquire() as conn:
                decision = await resolve_decision(conn, self.projection.name, poison.seq)
            if decision is not None:
                log.info("%s: operator chose %s for seq %d", self.durable, decision, poison.seq)
                self.status.state = RunnerState.RUNNING
                self.status.blocked_at = None
                self.status.last_error = None
                return
            await self._sleep(self.config.decision_poll_seconds)

    async def _nak_all(self, msgs: Sequence[Msg]) -> bool:
        """Ask for ``msgs`` again; False if a nak failed (the caller must re-attach: until
        their ack timeout, later events would be delivered before them)."""
        for msg in msgs:
            try:
                await msg.nak()
            except NATS_ERRORS:
                log.warning("%s: nak failed", self.durable, exc_info=True)
                return False
        return True

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            return

    async def lag(self) -> int:
        """Events of this projection's types in the log not yet applied (consumer's view)."""
        info = await self.store.js.consumer_info(self.store.stream, self.durable, timeout=1)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


def deliveries_in_step(msgs: Sequence[Msg], delivered: int) -> int:
    """How many of ``msgs``, from the first, follow consumer sequence ``delivered`` with no gap."""
    count = 0
    for msg in msgs:
        if int(msg.metadata.sequence.consumer) != delivered + count + 1:
            break
        count += 1
    return count


async def resolve_decision(conn: asyncpg.Connection, projection: str, seq: int) -> str | None:
    """Carry out an operator's decision on a parked event, if one was made.

    ``skip`` advances the checkpoint past the event; ``retry`` leaves it, so the event is
    applied again. Either way the parked row is marked resolved. Returns the decision.
    """
    async with conn.transaction():
        decision = await conn.fetchval(
            "SELECT decision FROM parked_events WHERE projection = $1 AND seq = $2 "
            "AND resolved_at IS NULL FOR UPDATE",
            projection,
            seq,
        )
        if decision is None:
            return None
        if decision == "skip":
            await conn.execute(
                "UPDATE projection_checkpoints SET last_seq = GREATEST(last_seq, $2), "
                "updated_at = now() WHERE projection = $1",
                projection,
                seq,
            )
        await conn.execute(
            "UPDATE parked_events SET resolved_at = now() WHERE projection = $1 AND seq = $2",
            projection,
            seq,
        )
        return str(decision)


async def decide(conn: asyncpg.Connection, projection: str, seq: int, decision: str) -> bool:
    """Record an operator's ``skip`` or ``retry`` for an open parked event; False if none."""
    if decision not in ("skip", "retry"):
        raise ValueError("decision must be skip or retry")
    result = await conn.execute(
        "UPDATE parked_events SET decision = $3, decided_at = now() "
        "WHERE projection = $1 AND seq = $2 AND resolved_at IS NULL",
        projection,
        seq,
        decision,
    )
    return bool(result.endswith(" 1"))


async def open_parked(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    """Parked events not yet resolved, oldest first (for the operator)."""
    rows = await conn.fetch(
        "SELECT projection, seq, subject, event_type, event_id, error, attempts, parked_at, "
        "decision FROM parked_events WHERE resolved_at IS NULL ORDER BY projection, seq"
    )
    return [dict(r.items()) for r in rows]
