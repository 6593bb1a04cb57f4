"""The envelope every event travels in, and how to write and read it.

Reading is two steps: ``decode_envelope`` reads the envelope and keeps the body as raw JSON,
then ``decode_event`` decodes the body by its type. So an event of a type this code does not
know (or a broken body) still yields an envelope, with its id and correlation, to park or skip.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from contracts.errors import MalformedEvent, UnknownEventType
from contracts.events import EVENT_TYPES, Event, UtcDateTime

__all__ = [
    "Cause",
    "Envelope",
    "MalformedEvent",
    "TraceContext",
    "UnknownEventType",
    "decode_envelope",
    "decode_event",
    "encode_envelope",
    "new_envelope",
]


class TraceContext(Struct, frozen=True, kw_only=True):
    """W3C trace context of the work that emitted the event, so consumers continue its trace."""

    traceparent: str | None = None
    tracestate: str | None = None


class Envelope(Struct, frozen=True, kw_only=True):
    """One event on the log: who, when and why, around the event's body.

    ``data`` stays raw JSON until ``decode_event``, so the envelope of an event whose type is
    unknown here still decodes. Unknown envelope fields are ignored (a newer producer may add
    some); ``correlation_id`` ties together everything one request caused, ``causation_id``
    names the event that directly caused this one.
    """

    event_id: Annotated[str, Meta(min_length=1, description="uuid4; also the Nats-Msg-Id")]
    type: Annotated[str, Meta(min_length=1, description="the event's TYPE, e.g. LicenseIssued")]
    version: Annotated[int, Meta(ge=1, description="the event's contract VERSION")]
    occurred_at: UtcDateTime
    customer_id: str | None
    correlation_id: Annotated[str, Meta(min_length=1)]
    causation_id: str | None = None
    trace: TraceContext = TraceContext()
    data: msgspec.Raw


class Cause(Struct, frozen=True, kw_only=True):
    """What an event was caused by, kept apart from the event: its id, correlation and trace.

    Work that outlives the consumer that started it (a queued job, a scheduled decision)
    keeps this, so what it appends later names its cause and continues (or links to) its trace.
    """

    event_id: Annotated[str, Meta(min_length=1)]
    correlation_id: Annotated[str, Meta(min_length=1)]
    trace: TraceContext = TraceContext()

    @classmethod
    def of(cls, envelope: Envelope) -> Cause:
        """The cause an envelope's event is for what it leads to."""
        return cls(
            event_id=envelope.event_id,
            correlation_id=envelope.correlation_id,
            trace=envelope.trace,
        )


_encoder = msgspec.json.Encoder()
_envelope_decoder = msgspec.json.Decoder(Envelope)
# One decoder per event type, built once: building a Decoder costs far more than using one.
_event_decoders: dict[str, msgspec.json.Decoder[Event]] = {
    name: msgspec.json.Decoder(cls) for name, cls in EVENT_TYPES.items()
}


def new_envelope(
    event: Event,
    *,
    customer_id: str | None,
    correlation_id: str | None = None,
    causation: Envelope | Cause | None = None,
    trace: TraceContext | None = None,
    event_id: str | None = None,
    occurred_at: datetime | None = None,
) -> Envelope:
    """Wrap ``event`` for the log, chaining correlation and causation from ``causation``.

    The correlation id is the explicit one, else the causing event's, else this event's own
    id (it starts a new chain). The body is checked against its type's constraints here, so a
    producer bug raises ``ValueError`` now instead of parking the event at every consumer.
    """
    body = _encode_checked_body(event)
    own_customer = getattr(event, "customer_id", None)
    if own_customer is not None and customer_id is not None and own_customer != customer_id:
        raise ValueError(
            f"{event.TYPE}: envelope customer_id {customer_id!r} differs from the event's "
            f"{own_customer!r}"
        )
    new_id = event_id or str(uuid.uuid4())
    if correlation_id is None:
        correlation_id = causation.correlation_id if causation is not None else new_id
    return Envelope(
        event_id=new_id,
        type=event.TYPE,
        version=event.VERSION,
        occurred_at=_utc(occurred_at) if occurred_at is not None else datetime.now(UTC),
        customer_id=customer_id,
        correlation_id=correlation_id,
        causation_id=causation.event_id if causation is not None else None,
        trace=trace if trace is not None else TraceContext(),
        data=msgspec.Raw(body),
    )


def _encode_checked_body(event: Event) -> bytes:
    decoder = _event_decoders.get(event.TYPE)
    if decoder is None or EVENT_TYPES[event.TYPE] is not type(event):
        raise UnknownEventType(
            f"{type(event).__qualname__} is not in contracts.events.EVENT_TYPES; register it"
        )
    body = _encoder.encode(event)
    try:
        decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{event.TYPE} would not decode on the log: {exc}") from exc
    return body


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"occurred_at must be timezone-aware, got {moment!r}")
    return moment.astimezone(UTC)


def encode_envelope(env: Envelope) -> bytes:
    """The envelope as the JSON bytes stored on the log."""
    return _encoder.encode(env)


def decode_envelope(data: bytes) -> Envelope:
    """Read an envelope from the log, leaving its body raw.

    Raises ``MalformedEvent`` with msgspec's reason (which names the bad field) for bytes
    that are not JSON, not an object, or lack a required envelope field.
    """
    try:
        return _envelope_decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
        raise MalformedEvent(f"malformed envelope: {exc}") from exc


def decode_event(env: Envelope) -> Event:
    """Decode the envelope's body as the event its ``type`` names.

    A body from a newer version decodes too: unknown fields are ignored and added fields
    have defaults. Raises ``UnknownEventType`` for a type not registered here and
    ``MalformedEvent`` for a body that does not fit its type.
    """
    decoder = _event_decoders.get(env.type)
    if decoder is None:
        raise UnknownEventType(
            f"unknown event type {env.type!r} (version {env.version}, event {env.event_id})"
        )
    try:
        return decoder.decode(env.data)
    except msgspec.DecodeError as exc:
        raise MalformedEvent(
            f"{env.type} v{env.version} (event {env.event_id}) has a bad body: {exc}"
        ) from exc
