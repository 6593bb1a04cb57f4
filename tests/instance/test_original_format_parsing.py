"""The original agent's wire format read into readings, its configuration reports, and the
temperature offset ingest applies: pure functions, no servers."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.instance.config_reports import MAX_REPORT, TemperatureOffsets, parse_report
from services.instance.original_format import (
    MAX_BATCH,
    MAX_MESSAGES,
    parse_sensor_message,
    topic_kind,
)
from services.instance.readings import parse_reading, record

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
OLDEST = NOW - timedelta(days=30)


def message(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "sensor_name": "bme688",
        "temperature": 21.5,
        "humidity": 45.0,
        "pressure": 101325,
        "gas_resistance": 125000,
        "timestamp": "2026-12-07T11:59:00.000Z",
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def batch(*messages: Any, **envelope: Any) -> bytes:
    return json.dumps(
        {"sensor": "bme688", "timestamp": "2026-12-07T11:59:30Z", "messages": list(messages)}
        | envelope
    ).encode()


def test_each_message_is_a_reading_at_its_own_time_and_pascals_become_hectopascals() -> None:
    parsed = parse_sensor_message(
        batch(
            message(timestamp="2026-12-07T11:58:00Z"),
            message(timestamp="2026-12-07T11:58:10+01:00", pressure=1013.2),
            message(timestamp=None),  # the batch's time
            message(timestamp=int(NOW.timestamp() * 1000) - 1000),  # epoch milliseconds
        ),
        NOW,
        OLDEST,
    )
    assert parsed.refused == [] and not parsed.heartbeat
    assert [m.ts for m in parsed.readings] == [
        datetime(2026, 12, 7, 11, 58, tzinfo=UTC),
        datetime(2026, 12, 7, 10, 58, 10, tzinfo=UTC),
        datetime(2026, 12, 7, 11, 59, 30, tzinfo=UTC),
        NOW - timedelta(seconds=1),
    ]
    assert [m.reading.pressure for m in parsed.readings] == [1013.25, 1013.2, 1013.25, 1013.25]
    assert [m.index for m in parsed.readings] == [0, 1, 2, 3]


def test_a_message_given_as_a_json_string_is_read_as_the_object() -> None:
    parsed = parse_sensor_message(
        batch(json.dumps(message(iaq=42.0, iaq_accuracy=3, co2_equivalent=600.0))), NOW, OLDEST
    )
    (only,) = parsed.readings
    assert (only.reading.temperature, only.reading.iaq, only.reading.iaq_accuracy) == (
        21.5,
        42.0,
        3,
    )
    assert (
        only.payload == json.dumps(message(iaq=42.0, iaq_accuracy=3, co2_equivalent=600.0)).encode()
    )


def test_bad_messages_are_refused_each_with_its_index_and_reason_and_the_rest_stand() -> None:
    parsed = parse_sensor_message(
        batch(
            message(humidity=140),
            message(),
            "{not json",
            7,
            message(pressure=5000),
            message(pressure=None),
            message(timestamp="yesterday"),
            message(timestamp="2026-12-07T11:00:00"),  # no offset
            message(timestamp="2026-12-07T13:00:00Z"),  # an hour ahead
            message(timestamp="2026-01-01T00:00:00Z"),  # past the retention
            message(timestamp=1.5),
            message(temperature="warm"),
            message(iaq_accuracy=9),
            json.dumps(message()) + " " * 5000,
            message(unknown_key="ignored", ts="ignored too"),
        ),
        NOW,
        OLDEST,
    )
    assert [m.index for m in parsed.readings] == [1, 14]
    reasons = {r.index: r.reason for r in parsed.refused}
    assert reasons[0] == "invalid: message 0: Expected `float` <= 100.0 - at `$.humidity`"
    assert reasons[2].startswith("malformed: message 2: ")
    assert reasons[3] == ("invalid: message 3: a message is a JSON object, or a JSON string of one")
    assert reasons[4] == (
        "invalid: message 4: pressure must be 300 to 1100 hPa or 30000 to 110000 Pa"
        " - at `$.pressure`"
    )
    assert reasons[5] == "invalid: message 5: Object missing required field `pressure`"
    assert reasons[6] == "invalid: message 6: timestamp is not RFC 3339"
    assert reasons[7] == "invalid: message 7: timestamp has no UTC offset"
    assert reasons[8] == "invalid: message 8: timestamp is in the future"
    assert reasons[9] == "invalid: message 9: timestamp is older than the data retention"
    assert reasons[10] == (
        "invalid: message 10: Expected `int | str`, got `float` - at `$.timestamp`"
    )
    assert "`$.temperature`" in reasons[11]
    assert "`$.iaq_accuracy`" in reasons[12]
    assert reasons[13].startswith("oversized: message 13: ")
    # Each refused message's own text is kept, for its dead letter.
    assert json.loads(next(r.payload for r in parsed.refused if r.index == 0))["humidity"] == 140


def test_a_message_without_any_timestamp_is_refused() -> None:
    body = json.dumps({"messages": [message(timestamp=None)]}).encode()
    (refused,) = parse_sensor_message(body, NOW, OLDEST).refused
    assert refused.reason == (
        "invalid: message 0: no timestamp, neither the message's nor the batch's"
    )


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "malformed: "),
        (b"[1, 2]", "invalid: a readings batch is a JSON object with a messages list"),
        (b'{"messages": {"a": 1}}', "invalid: a readings batch is a JSON object with a messages"),
        (
            json.dumps({"messages": [message()] * (MAX_MESSAGES + 1)}).encode(),
            f"invalid: {MAX_MESSAGES + 1} messages in one batch (at most {MAX_MESSAGES})",
        ),
        (b"{" + b" " * MAX_BATCH + b"}", "oversized: "),
    ],
)
def test_a_payload_that_is_not_a_batch_is_refused_whole(payload: bytes, reason: str) -> None:
    parsed = parse_sensor_message(payload, NOW, OLDEST)
    assert parsed.readings == [] and not parsed.heartbeat
    (refused,) = parsed.refused
    assert refused.index is None and refused.reason.startswith(reason)
    assert refused.payload == payload


def test_an_object_without_messages_is_a_heartbeat() -> None:
    parsed = parse_sensor_message(b'{"status": "online", "uptime": 12}', NOW, OLDEST)
    assert parsed.heartbeat and parsed.readings == [] and parsed.refused == []


def test_a_batch_of_the_most_messages_is_read_whole() -> None:
    messages = [
        message(timestamp=(NOW - timedelta(seconds=i)).isoformat()) for i in range(MAX_MESSAGES)
    ]
    parsed = parse_sensor_message(json.dumps({"messages": messages}).encode(), NOW, OLDEST)
    assert len(parsed.readings) == MAX_MESSAGES and parsed.refused == []


@pytest.mark.parametrize(
    ("topic", "kind"),
    [
        ("iot/device/abcdefgh12/sensor/bme688", "sensor"),
        ("iot/device/abcdefgh12/sensor/a/b", "sensor"),
        ("iot/device/abcdefgh12/config", "config"),
        ("iot/device/abcdefgh12/config/reported", "reported"),
        ("iot/device/abcdefgh12/sensor", None),
        ("iot/device/abcdefgh12/sensor/", None),
        ("iot/device/abcdefgh12/logs", None),
        ("iot/device/abcdefgh12/config/desired", None),
    ],
)
def test_topic_kinds(topic: str, kind: str | None) -> None:
    assert topic_kind(topic) == kind


def test_the_native_format_is_unchanged() -> None:
    body = json.dumps(
        {
            "ts": "2026-12-07T11:59:00Z",
            "temperature": 20.0,
            "humidity": 40,
            "pressure": 1000,
            "gas_resistance": 1e5,
            "extra": "ignored",
        }
    ).encode()
    ts, reading = parse_reading(body, NOW, OLDEST)
    assert ts == datetime(2026, 12, 7, 11, 59, tzinfo=UTC) and reading.pressure == 1000
    assert record("d1", ts, reading) == (
        "d1",
        ts,
        20.0,
        40.0,
        1000.0,
        1e5,
        None,
        None,
        None,
        None,
        None,
    )
    assert record("d1", ts, reading, 1.5)[2] == 21.5
    assert record("d1", ts, reading, 1.5)[-1] == 1.5
    with pytest.raises(ValueError, match=r"^invalid: ts is in the future$"):
        parse_reading(body.replace(b"2026-12-07T11", b"2026-12-07T13"), NOW, OLDEST)


def test_a_report_keeps_its_values_apart_from_its_version() -> None:
    report = parse_report(b'{"version": 3, "temperature_offset": -1.5, "heater_profile": "x"}')
    assert report.version == 3 and report.temperature_offset == -1.5
    assert json.loads(report.values) == {"temperature_offset": -1.5, "heater_profile": "x"}
    assert parse_report(b'{"version": 0}').temperature_offset is None


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{nope", "report malformed: "),
        (b"[1]", "report invalid: a report is a JSON object"),
        (b'{"reporting_interval": 5}', "report invalid: Object missing required field `version`"),
        (b'{"version": -1}', "report invalid: Expected `int` >= 0 - at `$.version`"),
        (b'{"version": "2"}', "report invalid: Expected `int`, got `str` - at `$.version`"),
        (b'{"version": 1, "temperature_offset": "2"}', "report invalid: Expected `float | null`"),
        (b'{"version": 1, "x": "' + b"y" * MAX_REPORT + b'"}', "report oversized: "),
    ],
)
def test_a_bad_report_is_refused_with_its_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=r"^report ") as refused:
        parse_report(payload)
    assert str(refused.value).startswith(reason)


def test_the_offset_is_applied_once_whoever_applies_it() -> None:
    offsets = TemperatureOffsets()
    offsets._desired = {"d1": 2.0, "d2": 0.5}
    assert offsets.applied("d1") == 2.0  # nothing reported: the platform applies it
    assert offsets.applied("other") is None  # no desired offset
    offsets.reported("d1", 2.0)
    assert offsets.applied("d1") is None  # the device applies it itself
    offsets.reported("d2", 0.2)
    assert offsets.applied("d2") == pytest.approx(0.3)  # an older offset: only the difference
    offsets.reported("d1", None)
    assert offsets.applied("d1") == 2.0
    offsets.forget("d1")
    assert offsets.applied("d1") is None
    offsets.mark_stale()
    assert offsets.due(0.0)
