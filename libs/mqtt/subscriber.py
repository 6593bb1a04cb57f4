"""A lean MQTT 5 subscriber for ingest: many QoS 1 messages, acknowledged once they are stored.

The instance's ingest must take tens of thousands of readings a second on one core and lose
none of them. The MQTT libraries for Python (paho, and aiomqtt over it) parse one packet per
event-loop turn and send each PUBACK as soon as the message is handed over, before it is
stored, so a crash loses what was buffered. This client does only what ingest needs:

- it connects with MQTT 5 (clean start off, a session that outlives the connection, a receive
  maximum so the broker holds back what is not acknowledged yet, a maximum packet size);
- it subscribes to its filters at QoS 1 and parses every whole packet in each chunk the socket
  gives, calling ``on_message(topic, payload, packet_id)`` synchronously;
- it sends PUBACKs only when told (``ack``), in one write, after the caller has stored the
  messages. Unacknowledged messages are delivered again by the broker after a reconnect, so
  delivery is at least once: after a crash between the commit and the PUBACK a message comes
  again, so the caller stores idempotently (ingest keys readings on device and time).

Anything else the broker sends (a refusal, a DISCONNECT, a malformed packet, silence past the
keep-alive) ends ``run`` with ``MqttSubscriberError`` naming the reason; the caller reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# Packet types (the high nibble of the first byte).
_CONNECT, _CONNACK, _PUBLISH, _PUBACK = 1, 2, 3, 4
_SUBSCRIBE, _SUBACK, _PINGREQ, _PINGRESP, _DISCONNECT = 8, 9, 12, 13, 14
# CONNECT properties.
_SESSION_EXPIRY, _RECEIVE_MAXIMUM, _MAXIMUM_PACKET_SIZE = 0x11, 0x21, 0x27

OnMessage = Callable[[str, bytes, int], None]


log = logging.getLogger(__name__)


class MqttSubscriberError(Exception):
    """The connection could not be made or was lost, and why."""


@dataclass(frozen=True, kw_only=True)
class SubscriberOptions:
    """Who connects where, to what, and how much the broker may send ahead of the acks."""

    host: str
    port: int
    client_id: str
    username: str | None = None
    password: str | None = None
    filters: tuple[str, ...] = ()
    keepalive: int = 30
    # How long the broker keeps the session (and unacknowledged messages) after a disconnect.
    session_expiry: int = 86_400
    # Unacknowledged QoS 1 messages the broker may have in flight to this client (at most 65535).
    receive_maximum: int = 20_000
    # Larger packets are not sent to this client by the broker.
    maximum_packet_size: int = 1 << 20


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + _varint(len(body)) + body


def connect_packet(options: SubscriberOptions) -> bytes:
    """CONNECT (MQTT 5) with a lasting session, the receive maximum and the packet size."""
    flags = (0x80 if options.username is not None else 0) | (
        0x40 if options.password is not None else 0
    )
    properties = (
        struct.pack("!BI", _SESSION_EXPIRY, options.session_expiry)
        + struct.pack("!BH", _RECEIVE_MAXIMUM, options.receive_maximum)
        + struct.pack("!BI", _MAXIMUM_PACKET_SIZE, options.maximum_packet_size)
    )
    body = (
        _string("MQTT")
        + bytes([5, flags])
        + struct.pack("!H", options.keepalive)
        + _varint(len(properties))
        + properties
        + _string(options.client_id)
    )
    if options.username is not None:
        body += _string(options.username)
    if options.password is not None:
        body += _string(options.password)
    return _packet(_CONNECT, 0, body)


def subscribe_packet(packet_id: int, filters: Sequence[str]) -> bytes:
    """SUBSCRIBE to each filter at QoS 1; retained messages only when the subscription is new
    (retain handling 1), not again at every reconnect of a lasting session."""
    body = struct.pack("!H", packet_id) + b"\x00"
    for topic_filter in filters:
        body += _string(topic_filter) + b"\x11"
    return _packet(_SUBSCRIBE, 2, body)


def _read_varint(buf: bytes | bytearray, pos: int, end: int) -> tuple[int, int] | None:
    """The variable-length integer at ``pos`` and the position after it; None if incomplete."""
    value, shift = 0, 0
    while pos < end:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise MqttSubscriberError("malformed packet: remaining length over 4 bytes")
    return None


class _Protocol(asyncio.Protocol):
    """Splits the byte stream into packets; PUBLISH goes straight to ``on_message``."""

    def __init__(
        self,
        on_message: OnMessage,
        on_control: Callable[[int, bytes], None],
        maximum_packet_size: int,
    ) -> None:
        self._on_message = on_message
        self._on_control = on_control
        self._maximum_packet_size = maximum_packet_size
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[BaseException | None] = (
            asyncio.get_running_loop().create_future()
        )
        self.last_heard = asyncio.get_running_loop().time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)

    def fail(self, reason: BaseException) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.last_heard = asyncio.get_running_loop().time()
        buf = self._buffer
        buf += data
        end = len(buf)
        pos = 0
        on_message = self._on_message
        try:
            while end - pos >= 2 and not self.closed.done():
                header = buf[pos]
                length = _read_varint(buf, pos + 1, end)
                if length is None:
                    break
                size, start = length
                if size > self._maximum_packet_size:
                    raise MqttSubscriberError(f"packet of {size} bytes, over the maximum")
                stop = start + size
                if stop > end:
                    break
                if header >> 4 == _PUBLISH:
                    qos = (header >> 1) & 3
                    if qos > 1:
                        raise MqttSubscriberError(f"PUBLISH at QoS {qos}; subscribed at 1")
                    topic_end = start + 2 + (buf[start] << 8 | buf[start + 1])
                    topic = buf[start + 2 : topic_end].decode()
                    at = topic_end
                    packet_id = 0
                    if qos:
                        packet_id = buf[at] << 8 | buf[at + 1]
                        at += 2
                    props = _read_varint(buf, at, stop)
                    if props is None or props[1] + props[0] > stop:
                        raise MqttSubscriberError("malformed PUBLISH properties")
                    on_message(topic, bytes(buf[props[1] + props[0] : stop]), packet_id)
                else:
                    self._on_control(header, bytes(buf[start:stop]))
                pos = stop
        except (MqttSubscriberError, IndexError, UnicodeDecodeError) as exc:
            self.fail(
                exc if isinstance(exc, MqttSubscriberError) else MqttSubscriberError(str(exc))
            )
        except Exception as exc:  # on_message failed: never leave the stream half-parsed
            log.exception("MQTT subscriber: a message handler failed")
            self.fail(MqttSubscriberError(f"message handler failed: {exc!r}"))
        finally:
            del buf[:pos]


class MqttSubscriber:
    """One connection at a time: ``run`` until it is lost; ``ack`` what has been stored."""

    def __init__(self, options: SubscriberOptions, on_message: OnMessage) -> None:
        """``on_message(topic, payload, packet_id)``; packet_id 0 means QoS 0 (no ack)."""
        self._options = options
        self._on_message = on_message
        self._protocol: _Protocol | None = None
        self._connected: asyncio.Future[None] | None = None
        self._subscribed: asyncio.Future[None] | None = None
        # Which connection a packet id belongs to: ids of a lost connection are not acked.
        self.connection = 0
        # Set while subscribed: from the SUBACK until the connection ends.
        self.subscribed = asyncio.Event()
        # Whether the broker still had this client's session (and its queued messages) at the
        # last CONNACK.
        self.session_present = False
        # When the last subscribed connection ended (monotonic), None before any did.
        self.lost_at: float | None = None

    def ack(self, connection: int, packet_ids: Sequence[int]) -> int:
        """PUBACK these packet ids of ``connection`` in one write, if it is still the current
        one (the broker delivers a lost connection's messages again). Returns how many."""
        protocol = self._protocol
        if connection != self.connection or protocol is None or protocol.transport is None:
            return 0
        if protocol.transport.is_closing():
            return 0
        ids = [pid for pid in packet_ids if pid]
        if ids:
            protocol.transport.write(b"".join(b"\x40\x02" + pid.to_bytes(2, "big") for pid in ids))
        return len(ids)

    async def run(self, connect_timeout: float = 10.0) -> None:
        """Connect, subscribe, and deliver messages until the connection ends; then raise
        ``MqttSubscriberError`` with the reason. Cancelling it disconnects cleanly."""
        loop = asyncio.get_running_loop()
        options = self._options
        self._connected = loop.create_future()
        self._subscribed = loop.create_future()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Protocol(self._on_message, self._control, options.maximum_packet_size),
                    options.host,
                    options.port,
                ),
                connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise MqttSubscriberError(f"cannot reach the broker: {exc or 'timed out'}") from None
        self.connection += 1
        self._protocol = protocol
        assert protocol.transport is not None
        transport = protocol.transport
        keepalive = asyncio.create_task(self._keep_alive(protocol))
        try:
            transport.write(connect_packet(options))
            await self._step(protocol, self._connected, connect_timeout, "CONNACK")
            transport.write(subscribe_packet(1, options.filters))
            await self._step(protocol, self._subscribed, connect_timeout, "SUBACK")
            self.subscribed.set()
            reason = await protocol.closed
            raise MqttSubscriberError(f"connection lost: {reason or 'closed by the broker'}")
        finally:
            if self.subscribed.is_set():
                self.lost_at = time.monotonic()
            self.subscribed.clear()
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive
            if not transport.is_closing():
                with contextlib.suppress(OSError):
                    transport.write(b"\xe0\x00")  # DISCONNECT, normal: the session stays
                transport.close()
            self._protocol = None

    async def _step(
        self, protocol: _Protocol, step: asyncio.Future[None], timeout: float, what: str
    ) -> None:
        waiting: set[asyncio.Future[Any]] = {step, protocol.closed}
        done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if step in done:
            step.result()  # raises the broker's refusal
            return
        if protocol.closed in done:
            raise MqttSubscriberError(
                f"connection closed before {what}: {protocol.closed.result()}"
            )
        raise MqttSubscriberError(f"no {what} within {timeout:.0f} s")

    def _control(self, header: int, body: bytes) -> None:
        kind = header >> 4
        if kind == _CONNACK:
            self.session_present = bool(body[:1] and body[0] & 1)
            if self.connection > 1 and not self.session_present:
                log.warning(
                    "MQTT %s: the broker kept no session; what was sent while disconnected "
                    "was not kept",
                    self._options.client_id,
                )
            self._settle(self._connected, _reason("connection refused", body, 1))
        elif kind == _SUBACK:
            at = 2
            props = _read_varint(body, at, len(body))
            codes = body[props[1] + props[0] :] if props else b""
            refused = [c for c in codes if c >= 0x80]
            error = (
                MqttSubscriberError(f"subscription refused (reason code 0x{refused[0]:02x})")
                if refused or not codes
                else None
            )
            self._settle(self._subscribed, error)
        elif kind == _DISCONNECT:
            error = _reason("disconnected by the broker", body, 0) or MqttSubscriberError(
                "disconnected by the broker"
            )
            if self._protocol is not None:
                self._protocol.fail(error)
        elif kind == _PINGRESP:
            pass
        elif self._protocol is not None:
            self._protocol.fail(MqttSubscriberError(f"unexpected packet type {kind}"))

    @staticmethod
    def _settle(future: asyncio.Future[None] | None, error: MqttSubscriberError | None) -> None:
        if future is None or future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    async def _keep_alive(self, protocol: _Protocol) -> None:
        """PINGREQ at half the keep-alive; give up on a broker silent for 1.5 times it."""
        loop = asyncio.get_running_loop()
        interval = max(self._options.keepalive / 2, 0.5)
        while True:
            await asyncio.sleep(interval)
            if loop.time() - protocol.last_heard > self._options.keepalive * 1.5:
                protocol.fail(MqttSubscriberError("the broker stopped answering"))
                return
            if protocol.transport is not None and not protocol.transport.is_closing():
                protocol.transport.write(b"\xc0\x00")


def _reason(what: str, body: bytes, at: int) -> MqttSubscriberError | None:
    """The failure in a CONNACK (reason at byte 1) or DISCONNECT (byte 0), if there is one."""
    if len(body) <= at:
        return None
    code = body[at]
    if code < 0x80:
        return None
    names = {
        0x80: "unspecified error",
        0x84: "unsupported protocol version",
        0x85: "client identifier not valid",
        0x86: "bad user name or password",
        0x87: "not authorized",
        0x88: "server unavailable",
        0x89: "server busy",
        0x8B: "server shutting down",
        0x8E: "session taken over",
        0x95: "packet too large",
        0x97: "quota exceeded",
    }
    return MqttSubscriberError(f"{what}: {names.get(code, f'reason code 0x{code:02x}')}")
