"""The original Iotistic agent's wire format: what a fleet device publishes on
``iot/device/<uuid>/sensor/<topic>``, read into our readings.

A readings batch is a JSON object ``{"sensor": name, "timestamp": ISO 8601, "messages": [...]}``
(at most ``MAX_BATCH`` bytes and ``MAX_MESSAGES`` messages). Each message is one reading, an
object with the BME688's fields (``temperature``, ``humidity``, ``pressure``, ``gas_resistance``,
``timestamp``, and optionally ``sensor_name``, ``iaq``, ``iaq_accuracy``, ``co2_equivalent``,
``breath_voc_equivalent``), or the same object as a JSON string. A message is checked as a native
reading is (the same ``Reading`` and ranges; unknown keys are ignored, as the native format
ignores them); its own ``timestamp`` (else the batch's) is its time; a pressure in pascals
(``PASCALS``, as the BME68x driver gives it) is converted to hectopascals, one in ``HECTOPASCALS``
is taken as it is. Every good message is a reading; every bad one is refused with its index and
reason, and the rest of the batch stands. A JSON object without ``messages`` is a heartbeat.
Pure functions: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec

from services.instance.readings import MAX_PAYLOAD, Reading, Rejected, reading_time

MAX_BATCH = 256 * 1024
MAX_MESSAGES = 1000
PASCALS = (30_000, 110_000)
HECTOPASCALS = (300, 1100)
NOT_A_BATCH = "invalid: a readings batch is a JSON object with a messages list"
# JSON nested deeper than the decoder goes (it raises RecursionError, not a DecodeError).
TOO_DEEP = "malformed: nested too deeply"


def topic_kind(topic: str) -> str | None:
    """What a topic under ``iot/device/<uuid>/`` carries: ``sensor`` (readings batches and
    heartbeats), ``config`` (the desired configuration, published by the instance), ``reported``
    (the configuration the device applied); None for any other."""
    rest = topic.split("/")[3:]
    if len(rest) >= 2 and rest[0] == "sensor" and all(rest[1:]):
        return "sensor"
    if rest == ["config"]:
        return "config"
    if rest == ["config", "reported"]:
        return "reported"
    return None


@dataclass(frozen=True)
class Refused:
    """A message not stored: its index in the batch (None for the whole batch), why, and
    what it was (for the dead letter)."""

    index: int | None
    reason: str
    payload: bytes


@dataclass(frozen=True)
class Accepted:
    """A good message: its index, time and reading, and what it was (a dead letter's payload,
    should it be refused later, in read-only mode)."""

    index: int
    ts: datetime
    reading: Reading
    payload: bytes


@dataclass
class SensorMessage:
    """What one message on a sensor topic holds: a heartbeat, or a batch of readings."""

    heartbeat: bool = False
    readings: list[Accepted] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)


def parse_sensor_message(payload: bytes, now: datetime, oldest: datetime) -> SensorMessage:
    """The heartbeat or the readings (and the refused messages) of a sensor topic's payload;
    readings must be from ``oldest`` to a little after ``now``."""
    if len(payload) > MAX_BATCH:
        return _whole(f"oversized: {len(payload)} bytes (at most {MAX_BATCH})", payload)
    try:
        body = msgspec.json.decode(payload)
    except msgspec.DecodeError as exc:
        return _whole(f"malformed: {exc}", payload)
    except RecursionError:
        return _whole(TOO_DEEP, payload)
    if not isinstance(body, dict):
        return _whole(NOT_A_BATCH, payload)
    if "messages" not in body:
        return SensorMessage(heartbeat=True)
    messages = body["messages"]
    if not isinstance(messages, list):
        return _whole(NOT_A_BATCH, payload)
    if len(messages) > MAX_MESSAGES:
        return _whole(
            f"invalid: {len(messages)} messages in one batch (at most {MAX_MESSAGES})", payload
        )
    parsed = SensorMessage()
    for index, message in enumerate(messages):
        raw = message.encode() if isinstance(message, str) else msgspec.json.encode(message)
        try:
            ts, reading = parse_original_reading(message, body.get("timestamp"), now, oldest)
        except Rejected as exc:
            parsed.refused.append(Refused(index, _at(index, str(exc)), raw))
        else:
            parsed.readings.append(Accepted(index, ts, reading, raw))
    return parsed


def parse_original_reading(
    message: Any, batch_time: Any, now: datetime, oldest: datetime
) -> tuple[datetime, Reading]:
    """One message of a batch (an object, or a JSON string of one) as a reading and its time;
    ``batch_time`` is the batch's ``timestamp``, for a message without its own. ``Rejected``
    with the reason when it is not a reading we store."""
    if isinstance(message, str):
        if len(message) > MAX_PAYLOAD:
            raise Rejected(f"oversized: {len(message)} characters (at most {MAX_PAYLOAD})")
        try:
            message = msgspec.json.decode(message)
        except msgspec.DecodeError as exc:
            raise Rejected(f"malformed: {exc}") from None
        except RecursionError:
            # Not an error of this code: one message, refused; the rest of its batch stands.
            raise Rejected(TOO_DEEP) from None
    if not isinstance(message, dict):
        raise Rejected("invalid: a message is a JSON object, or a JSON string of one")
    fields = {k: v for k, v in message.items() if k != "ts"}
    stamp = fields.pop("timestamp", None)
    if stamp is None:
        stamp = batch_time
    if stamp is None:
        raise Rejected("invalid: no timestamp, neither the message's nor the batch's")
    fields["ts"] = stamp
    if "pressure" in fields:
        fields["pressure"] = _hectopascals(fields["pressure"])
    try:
        reading = msgspec.convert(fields, Reading)
    except msgspec.ValidationError as exc:
        raise Rejected(f"invalid: {str(exc).replace('`$.ts`', '`$.timestamp`')}") from None
    return reading_time(reading.ts, now, oldest, "timestamp"), reading


def _hectopascals(pressure: Any) -> Any:
    """A pressure in pascals as hectopascals; one in hectopascals, or not a number (refused
    by the reading's type), as it is; ``Rejected`` when it is neither."""
    if isinstance(pressure, bool) or not isinstance(pressure, int | float):
        return pressure
    if PASCALS[0] <= pressure <= PASCALS[1]:
        return pressure / 100
    if HECTOPASCALS[0] <= pressure <= HECTOPASCALS[1]:
        return pressure
    raise Rejected(
        f"invalid: pressure must be {HECTOPASCALS[0]} to {HECTOPASCALS[1]} hPa or "
        f"{PASCALS[0]} to {PASCALS[1]} Pa - at `$.pressure`"
    )


def _at(index: int, reason: str) -> str:
    """The reason with the message's index after its kind (``invalid: message 3: ...``): the
    kind stays first, as the rejection metrics count by it."""
    kind, _, rest = reason.partition(": ")
    return f"{kind}: message {index}: {rest}"


def _whole(reason: str, payload: bytes) -> SensorMessage:
    return SensorMessage(refused=[Refused(None, reason, payload)])
