"""The event log: one JetStream stream that every service appends to and projects from.

Subjects are ``<prefix>.<EventType>.<key>``: the type first, so a projection subscribes to the
types it handles with one filter each; the key names the thing the event is about (normally the
customer id), so "first writer wins" can be asked of JetStream for one thing at a time with
``Nats-Expected-Last-Subject-Sequence``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from contracts import Cause, Envelope, Event, TraceContext, encode_envelope, new_envelope
from libs.config import EventLogSettings
from libs.eventlog.errors import AppendRefused, ConcurrencyConflict, EventStoreError
from libs.eventlog.reader import LogReader, ReadPosition, StoredMessage
from libs.observability.telemetry import current_trace_context

log = logging.getLogger(__name__)

_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# JetStream's error code for a failed expected-last-(subject-)sequence check.
_WRONG_LAST_SEQUENCE = 10071

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


@dataclass(frozen=True)
class Appended:
    """Where an appended event landed; ``duplicate`` when the log already had its event id."""

    envelope: Envelope
    subject: str
    seq: int
    duplicate: bool


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
        causation: Envelope | Cause | None = None,
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
        filters: list[str] | None = None,
        consumer_name: str | None = None,
    ) -> AsyncIterator[StoredMessage]:
        """Yield the log's messages in order from ``from_seq`` (through ``to_seq``).

        Uses a short-lived ephemeral consumer, so reading never moves any service's position.
        With ``follow`` it keeps waiting for new events instead of stopping at the end. A fetch
        that times out ends a bounded read only once the consumer has nothing left to deliver;
        a delivery that never arrives raises ``EventStoreError``. ``position``, if given, is
        kept up to date with how far the read covered the log. ``filters`` (subjects) instead
        of ``event_types``; ``consumer_name`` names the reader's consumer (a service may create
        only the ones it declares: ``ServiceDefinition.reader_names``).
        """
        if filters is None:
            filters = (
                self.filter_for(event_types) if event_types is not None else [f"{self.prefix}.>"]
            )
        end = to_seq if to_seq is not None else (None if follow else await self.last_seq())
        reader = LogReader(self._js, self.stream, filters, batch, consumer_name)
        position = position if position is not None else ReadPosition()
        messages = reader.read(from_seq, end, follow=follow, position=position)
        # Closed with this generator, so a reader that stops early ends its consumer at once.
        async with contextlib.aclosing(messages):
            async for stored in messages:
                yield stored


def traced_envelope(
    event: Event,
    *,
    customer_id: str | None,
    causation: Envelope | Cause | None = None,
    event_id: str | None = None,
) -> Envelope:
    """``event`` in an envelope that carries the current span's trace context, else (no span
    is recording) its cause's, so an event appended outside any span still continues the trace
    of what caused it."""
    trace = current_trace_context()
    carried = TraceContext(traceparent=trace.get("traceparent"), tracestate=trace.get("tracestate"))
    if carried.traceparent is None and causation is not None:
        carried = causation.trace
    return new_envelope(
        event, customer_id=customer_id, causation=causation, trace=carried, event_id=event_id
    )


def caused_event_id(cause: Envelope, purpose: str) -> str:
    """The id of the event that answers ``cause`` for ``purpose``, the same on every attempt.

    A consumer that answers an event again (redelivered after a crash) appends an event with
    the same id, which JetStream stores once.
    """
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"iotistic:{cause.event_id}:{purpose}"))
