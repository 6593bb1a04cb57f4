"""The event log: one JetStream stream that every service appends to and projects from.

Subjects are ``<prefix>.<EventType>.<key>``: the type first, so a projection subscribes to the
types it handles with one filter each; the key names the thing the event is about (normally the
customer id), so "first writer wins" can be asked of JetStream for one thing at a time with
``Nats-Expected-Last-Subject-Sequence``.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from contracts import Envelope, Event, TraceContext, encode_envelope, new_envelope
from libs.config import EventLogSettings
from libs.observability.telemetry import current_trace_context

log = logging.getLogger(__name__)

_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# JetStream's error code for a failed expected-last-(subject-)sequence check.
_WRONG_LAST_SEQUENCE = 10071

# Fetch timeouts in a row, with the consumer still owing events, before a read gives up.
_READ_STALL_CHECKS = 40

# How long a failed append keeps readiness red when no append has succeeded since (an append
# that works clears it at once; without traffic, it fades after this).
WRITE_FAILURE_SECONDS = 20.0

# The server names the sequence it found: "wrong last sequence: 42".
_FOUND_SEQUENCE = re.compile(r"wrong last sequence: (\d+)")

# nats-server 2.11+: check the expected last sequence on these subjects (wildcards allowed).
HEADER_EXPECTED_ON = "Nats-Expected-Last-Subject-Sequence-Subject"
HEADER_EVENT_TYPE = "Iotistic-Event-Type"
HEADER_TRACEPARENT = "traceparent"
HEADER_TRACESTATE = "tracestate"


class EventStoreError(RuntimeError):
    """The log could not take or give an event (connection, timeout, stream missing).

    Transient: the same append may succeed later.
    """


class AppendRefused(EventStoreError):
    """The log certainly did not store the event: the connection was down before it was sent,
    or the server answered with an error (a full stream or disk, a refused permission).

    A caller may undo what it prepared for the event; a plain ``EventStoreError`` from an
    append (a timeout, a connection lost after sending) leaves it unknown whether the event was
    stored, and the caller must keep what a later retry needs to find the first outcome.
    """


class ConcurrencyConflict(Exception):
    """Another writer appended to the subject first; the caller lost the race (final).

    ``last_seq`` is the sequence the server found instead of the one expected, when it said.
    """

    def __init__(self, subject: str, last_seq: int | None = None) -> None:
        super().__init__(f"another event was appended to {subject} first")
        self.subject = subject
        self.last_seq = last_seq


@dataclass(frozen=True)
class Appended:
    """Where an appended event landed; ``duplicate`` when the log already had its event id."""

    envelope: Envelope
    subject: str
    seq: int
    duplicate: bool


@dataclass(frozen=True)
class StoredMessage:
    """A message read back from the log, not yet decoded (it may be malformed)."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]

    @property
    def event_type(self) -> str:
        """The event type its subject names (``<prefix>.<EventType>.<key>``)."""
        parts = self.subject.rsplit(".", 2)
        return parts[-2] if len(parts) == 3 else ""


class EventStore:
    """Appends events to the log and reads them back."""

    def __init__(self, js: JetStreamContext, settings: EventLogSettings) -> None:
        """Use ``js`` for the stream named in ``settings``; call ``ensure_stream`` once at start."""
        self._js = js
        self.settings = settings
        self.stream = settings.events_stream
        self.prefix = settings.events_subject_prefix
        # (monotonic time, reconnects then, reason) of the last append that failed, until
        # one succeeds.
        self._failed_write: tuple[float, int, str] | None = None

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context (for consumers built on this log)."""
        return self._js

    def stream_config(self) -> api.StreamConfig:
        """The stream as this deployment wants it; limits refuse new writes, never drop events."""
        s = self.settings
        return api.StreamConfig(
            name=self.stream,
            subjects=[f"{self.prefix}.>"],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            discard=api.DiscardPolicy.NEW,
            num_replicas=s.events_replicas,
            max_bytes=s.events_max_bytes or -1,
            max_age=float(s.events_max_age_seconds),
            duplicate_window=float(s.events_duplicate_window_seconds),
            allow_direct=True,
            description="Iotistic domain events: the source of truth of every service",
        )

    async def stream_info(self) -> api.StreamInfo:
        """The stream as the server has it; ``NotFoundError`` when it does not exist."""
        return await self._js.stream_info(self.stream)

    async def ensure_stream(self) -> api.StreamInfo:
        """Create the stream, or bring an existing one to the configured settings."""
        config = self.stream_config()
        try:
            await self._js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            log.info("creating stream %s (%s)", self.stream, config.subjects)
            return await self._js.add_stream(config)
        return await self._js.update_stream(config)

    def subject(self, event_type: str, key: str) -> str:
        """The subject an event of ``event_type`` about ``key`` is appended to."""
        if not _KEY.match(key):
            raise ValueError(f"subject key {key!r} must be 1-128 of A-Z a-z 0-9 _ -")
        return f"{self.prefix}.{event_type}.{key}"

    def filter_for(self, event_types: Iterable[str]) -> list[str]:
        """Subject filters that match every event of the given types."""
        return [f"{self.prefix}.{name}.*" for name in sorted(set(event_types))]

    async def append(
        self,
        envelope: Envelope,
        *,
        key: str | None = None,
        expected_last_subject_seq: int | None = None,
        expected_on: str | None = None,
        timeout: float = 5.0,
    ) -> Appended:
        """Append one event, stored once per event id (``Nats-Msg-Id``).

        ``key`` defaults to the envelope's customer id. With ``expected_last_subject_seq`` the
        append succeeds only if the subject's last event has that sequence (0 = none yet);
        otherwise ``ConcurrencyConflict`` is raised and nothing is stored. ``expected_on``
        checks that sequence on other subjects instead (a filter such as
        ``customer_filter(id)``: the last of all of a customer's events). The check comes
        before JetStream's duplicate check: a repeat of a stored event conflicts.
        """
        subject_key = key or envelope.customer_id
        if subject_key is None:
            raise ValueError(f"{envelope.type}: an event without a customer id needs a key")
        subject = self.subject(envelope.type, subject_key)
        if not self._js._nc.is_connected:
            # nats-py would buffer the publish and wait out the timeout for an ack that cannot
            # come; a caller answering a person should hear at once that the log is away.
            raise AppendRefused(f"append to {subject}: not connected to NATS")
        headers = {
            api.Header.MSG_ID: envelope.event_id,
            HEADER_EVENT_TYPE: envelope.type,
        }
        if envelope.trace.traceparent:
            headers[HEADER_TRACEPARENT] = envelope.trace.traceparent
        if envelope.trace.tracestate:
            headers[HEADER_TRACESTATE] = envelope.trace.tracestate
        if expected_last_subject_seq is not None:
            headers[api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE] = str(expected_last_subject_seq)
            if expected_on is not None:
                headers[HEADER_EXPECTED_ON] = expected_on
        reconnects = self._reconnects()
        try:
            ack = await self._js.publish(
                subject,
                encode_envelope(envelope),
                timeout=timeout,
                stream=self.stream,
                headers=headers,
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code == _WRONG_LAST_SEQUENCE:
                found = _FOUND_SEQUENCE.search(exc.description or "")
                last_seq = int(found.group(1)) if found else None
                raise ConcurrencyConflict(expected_on or subject, last_seq) from exc
            self._write_failed(f"refused: {exc.description or exc}", reconnects)
            raise AppendRefused(f"append to {subject} refused: {exc}") from exc
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            self._write_failed(f"no answer: {type(exc).__name__}", reconnects)
            raise EventStoreError(f"append to {subject} failed: {exc!r}") from exc
        self._failed_write = None
        return Appended(envelope, subject, ack.seq, bool(ack.duplicate))

    def _write_failed(self, why: str, reconnects_before: int) -> None:
        self._failed_write = (time.monotonic(), reconnects_before, why)

    def _reconnects(self) -> int:
        return int(self._js._nc.stats.get("reconnects", 0))

    def refusing_writes(self, within: float = WRITE_FAILURE_SECONDS) -> str | None:
        """Why the last append failed, if it did within ``within`` seconds and none has
        succeeded since (a full disk, a stream at its limits, a server that does not answer);
        None while appends go through. A failure on a connection that was made again since
        the append began (the connection was what failed) counts no more. Readiness reports
        it."""
        if self._failed_write is None:
            return None
        at, reconnects, why = self._failed_write
        if self._reconnects() != reconnects:
            return None
        return why if time.monotonic() - at <= within else None

    async def publish(
        self,
        event: Event,
        *,
        customer_id: str | None,
        causation: Envelope | None = None,
        key: str | None = None,
        expected_last_subject_seq: int | None = None,
        expected_on: str | None = None,
        event_id: str | None = None,
    ) -> Appended:
        """Wrap ``event`` in an envelope carrying the current trace and append it."""
        envelope = traced_envelope(
            event, customer_id=customer_id, causation=causation, event_id=event_id
        )
        return await self.append(
            envelope,
            key=key,
            expected_last_subject_seq=expected_last_subject_seq,
            expected_on=expected_on,
        )

    def customer_filter(self, customer_id: str) -> str:
        """The subjects of every event keyed by ``customer_id`` (all types)."""
        return self.subject("*", customer_id)

    async def consumer_pending(self, durable: str) -> int:
        """Events of a durable consumer's types not yet delivered and acknowledged."""
        info = await self._js.consumer_info(self.stream, durable, timeout=2)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def last_seq(self) -> int:
        """The sequence of the newest event in the log (0 when empty)."""
        info = await self._js.stream_info(self.stream)
        return int(info.state.last_seq)

    async def identity(self) -> tuple[datetime | None, int]:
        """When the stream was created (which tells one stream from a later one of the same
        name) and the sequence of its newest event."""
        info = await self._js.stream_info(self.stream)
        return info.created, int(info.state.last_seq)

    async def first_seq(self) -> int:
        """The sequence of the oldest event still in the log."""
        info = await self._js.stream_info(self.stream)
        return int(info.state.first_seq)

    async def last_seq_of(self, event_type: str, key: str) -> int:
        """The sequence of the newest event on one subject (0 when there is none)."""
        try:
            msg = await self._js.get_last_msg(self.stream, self.subject(event_type, key))
        except nats.js.errors.NotFoundError:
            return 0
        return int(msg.seq or 0)

    async def subject_counts(
        self, filter_subject: str | None = None
    ) -> tuple[int, int, dict[str, int]]:
        """First and last sequence and the message count per subject, from one stream info.

        One snapshot, so the counts add up to what lies between the two sequences. It only
        asks the server what it keeps in memory: no consumer is made and nothing is written,
        so it answers even when the server's disk is full.
        """
        info = await self._js.stream_info(
            self.stream, subjects_filter=filter_subject or f"{self.prefix}.>"
        )
        counts = {str(k): int(v) for k, v in (info.state.subjects or {}).items()}
        return int(info.state.first_seq), int(info.state.last_seq), counts

    async def count_by_subject(self, filter_subject: str | None = None) -> dict[str, int]:
        """Message counts per subject (JetStream keeps them; no scan of the log)."""
        return (await self.subject_counts(filter_subject))[2]

    async def read(
        self,
        *,
        from_seq: int = 1,
        to_seq: int | None = None,
        event_types: Iterable[str] | None = None,
        batch: int = 500,
        follow: bool = False,
        position: ReadPosition | None = None,
    ) -> AsyncIterator[StoredMessage]:
        """Yield the log's messages in order from ``from_seq`` (through ``to_seq``).

        Uses a short-lived ephemeral consumer, so reading never moves any service's position.
        With ``follow`` it keeps waiting for new events instead of stopping at the end. A fetch
        that times out ends a bounded read only once the consumer has nothing left to deliver;
        a delivery that never arrives raises ``EventStoreError``. ``position``, if given, is
        kept up to date with how far the read covered the log.
        """
        filters = self.filter_for(event_types) if event_types is not None else [f"{self.prefix}.>"]
        end = to_seq if to_seq is not None else (None if follow else await self.last_seq())
        position = position if position is not None else ReadPosition()
        if end is not None and end < from_seq:
            position.through = end
            return
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(from_seq, 1),
            ack_policy=api.AckPolicy.NONE,
            filter_subjects=filters,
            inactive_threshold=60.0,
            max_waiting=1,
            mem_storage=True,
        )
        sub = await self._js.pull_subscribe("", stream=self.stream, config=config)
        received = 0  # consumer sequence of the last delivery received
        stalls = 0
        try:
            while True:
                try:
                    # Short waits: a batch fetch lingers until full or timed out (see runner).
                    msgs = await sub.fetch(batch, timeout=0.25)
                except (nats.errors.TimeoutError, TimeoutError):
                    stalls += 1
                    if follow or end is None:
                        continue
                    if await self._read_is_complete(sub, received, stalls):
                        position.through = end
                        return
                    continue
                stalls = 0
                for msg in msgs:
                    received = self._next_delivery(msg, received)
                    stored = to_stored(msg)
                    if end is not None and stored.seq > end:
                        position.through = end
                        return
                    yield stored
                    position.through = stored.seq
                    if end is not None and stored.seq >= end:
                        return
                if not follow and end is not None and msgs and msgs[-1].metadata.num_pending == 0:
                    position.through = end
                    return
        finally:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                log.debug("reader unsubscribe failed", exc_info=True)

    def _next_delivery(self, msg: Msg, received: int) -> int:
        """The delivery's consumer sequence, which must follow ``received`` without a gap."""
        delivered = int(msg.metadata.sequence.consumer)
        if delivered != received + 1:
            # The reader's consumer never redelivers (no acks): what was skipped is gone.
            raise EventStoreError(
                f"read of {self.stream}: delivery {received + 1} was lost "
                f"(got {delivered}, stream seq {msg.metadata.sequence.stream})"
            )
        return delivered

    async def _read_is_complete(
        self, sub: JetStreamContext.PullSubscription, received: int, stalls: int
    ) -> bool:
        """After a fetch timed out: True when the reader's consumer has nothing left to deliver
        and all it delivered arrived. A timeout alone says nothing about the end of the log (a
        slow server or network looks the same)."""
        try:
            info = await sub.consumer_info()
        except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as exc:
            raise EventStoreError(f"read of {self.stream} lost its consumer: {exc!r}") from exc
        delivered = int((info.delivered.consumer_seq or 0) if info.delivered else 0)
        # Deliveries sent before the timeout may still be on their way: the next fetch takes them.
        if not info.num_pending and delivered <= received:
            return True
        if stalls >= _READ_STALL_CHECKS:
            raise EventStoreError(
                f"read of {self.stream} stalled: {info.num_pending} events not delivered, "
                f"{delivered - received} delivered but not received"
            )
        return False


@dataclass
class ReadPosition:
    """How far a read covered the log: every matching event through ``through`` was yielded."""

    through: int = 0


def traced_envelope(
    event: Event,
    *,
    customer_id: str | None,
    causation: Envelope | None = None,
    event_id: str | None = None,
) -> Envelope:
    """``event`` in an envelope that carries the current span's trace context."""
    trace = current_trace_context()
    return new_envelope(
        event,
        customer_id=customer_id,
        causation=causation,
        trace=TraceContext(
            traceparent=trace.get("traceparent"), tracestate=trace.get("tracestate")
        ),
        event_id=event_id,
    )


def caused_event_id(cause: Envelope, purpose: str) -> str:
    """The id of the event that answers ``cause`` for ``purpose``, the same on every attempt.

    A consumer that answers an event again (redelivered after a crash) appends an event with
    the same id, which JetStream stores once.
    """
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"iotistic:{cause.event_id}:{purpose}"))


def to_stored(msg: Msg) -> StoredMessage:
    """The parts of a JetStream message a projection or reader needs."""
    meta = msg.metadata
    return StoredMessage(
        seq=int(meta.sequence.stream),
        subject=msg.subject,
        data=msg.data,
        headers=dict(msg.headers or {}),
    )
