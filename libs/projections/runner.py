"""The projection runner: one durable JetStream consumer per projection, applied in order.

Order matters to a read model, so one process at a time consumes a projection (a Postgres
advisory lock; other replicas wait on standby), and every delivery must follow the one before
it. Events are applied with their checkpoint in one transaction (``libs/projections/apply.py``)
and acknowledged only after that commit. An event that cannot be applied is parked and stops
the projection where it is (``libs/projections/parking.py``): it moves on only when an operator
decides (`iotistic parked skip|retry`). The service keeps serving what it has meanwhile;
readiness and metrics show it.

Longer than 400 lines because ``ProjectionRunner`` is one state machine (take the lead, attach
the consumer, consume in step, retry or park, wait for the operator's decision) whose steps all
share its status, its lock's connection and its epoch; what does not need them is elsewhere
(applying in ``apply.py``, checkpoints in ``checkpoints.py``, parked rows in ``parking.py``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api
from opentelemetry import trace

from libs.db.postgres import CONNECTION_ERRORS
from libs.eventlog.connection import NATS_ERRORS
from libs.eventlog.reader import StoredMessage, to_stored
from libs.eventlog.store import EventStore
from libs.observability.metrics import ProjectionMetrics
from libs.observability.telemetry import context_from, tracer
from libs.projections.apply import (
    TRANSIENT_ERRORS,
    ApplyOutcome,
    PoisonEvent,
    Projection,
    apply_event,
    apply_stored,
)
from libs.projections.checkpoints import (
    LogMismatch,
    LostLeadership,
    check_stream,
    ensure_checkpoint,
    lock_checkpoint,
    save_checkpoint,
    take_leadership,
)
from libs.projections.parking import park, resolve_decision

log = logging.getLogger(__name__)


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
            if idle:
                self._show_pending(0)  # the consumer had nothing to deliver
            in_step = deliveries_in_step(msgs, delivered)
            if in_step:
                delivered = int(msgs[in_step - 1].metadata.sequence.consumer)
                await self._apply_batch(msgs[:in_step])
                self._show_pending(int(msgs[in_step - 1].metadata.num_pending or 0))
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
            await park(conn, self.projection.name, stored, poison.reason, attempts)
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
        lag = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        self._show_pending(lag)
        return lag

    def _show_pending(self, pending: int) -> None:
        # Set as each batch is applied (the last event says what is left after it) and at
        # each readiness check (which sees a projection that is stuck and applies nothing).
        self.metrics.show_pending(self.service, self.projection.name, pending)


def deliveries_in_step(msgs: Sequence[Msg], delivered: int) -> int:
    """How many of ``msgs``, from the first, follow consumer sequence ``delivered`` with no gap."""
    count = 0
    for msg in msgs:
        if int(msg.metadata.sequence.consumer) != delivered + count + 1:
            break
        count += 1
    return count
