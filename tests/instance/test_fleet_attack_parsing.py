"""What a malicious fleet device publishes to break ingest's parsing of the original wire format
and of configuration reports: JSON nested deeper than the decoder goes (a whole batch, one
message of a batch given as a JSON string, a report), numbers beyond a double, NaN spelled
out. Each is refused with its reason; the good messages of a batch stand. Pure functions."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from services.instance.api.device_config import BODY_LIMIT as CONFIG_BODY_LIMIT
from services.instance.config_reports import parse_report
from services.instance.device_config import desired_config, payload
from services.instance.original_format import parse_sensor_message
from services.instance.readings import Rejected, parse_reading

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
OLDEST = NOW - timedelta(days=30)
# Deeper than the decoder's recursion allows, and small enough for every size limit.
DEEP = "[" * 1500 + "]" * 1500


@pytest.fixture(autouse=True)
def interpreter_default_recursion_limit() -> Iterator[None]:
    """The instance runs with the interpreter's default recursion limit (1000), which bounds
    how deep msgspec decodes; libraries the test process loads may raise it (celpy sets 2500
    when the chart's CEL rules are checked), under which DEEP would decode."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(before)


def good() -> dict[str, Any]:
    return {
        "temperature": 21.5,
        "humidity": 45.0,
        "pressure": 101325,
        "gas_resistance": 125000,
        "timestamp": "2026-12-07T11:59:00Z",
    }


def test_a_deeply_nested_message_is_refused_and_the_rest_of_its_batch_stands() -> None:
    nested = json.dumps(good())[:-1] + ', "x": ' + DEEP + "}"
    payload = json.dumps({"messages": [good(), DEEP, nested]})
    parsed = parse_sensor_message(payload.encode(), NOW, OLDEST)
    assert [m.index for m in parsed.readings] == [0]
    assert [(r.index, r.reason.split(":")[0]) for r in parsed.refused] == [
        (1, "malformed"),
        (2, "malformed"),
    ]
    assert all("nested too deeply" in r.reason for r in parsed.refused)


def test_a_deeply_nested_batch_is_one_malformed_dead_letter() -> None:
    for sent in (DEEP, json.dumps({"messages": [good()], "x": "?"}).replace('"?"', DEEP)):
        parsed = parse_sensor_message(sent.encode(), NOW, OLDEST)
        assert parsed.readings == [] and not parsed.heartbeat
        assert [r.reason for r in parsed.refused] == ["malformed: nested too deeply"]


@pytest.mark.parametrize("number", ["1e999", "-1e400", "NaN", "Infinity"])
def test_numbers_beyond_a_double_are_refused_not_stored(number: str) -> None:
    payload = json.dumps({"messages": [good(), "?"]}).replace('"?"', f'{{"temperature": {number}}}')
    parsed = parse_sensor_message(payload.encode(), NOW, OLDEST)
    if parsed.refused and parsed.refused[0].index is None:
        return  # the whole batch refused as malformed: nothing stored
    assert [m.index for m in parsed.readings] == [0]
    assert [r.index for r in parsed.refused] == [1]


def test_a_deeply_nested_report_is_refused_with_its_reason() -> None:
    with pytest.raises(ValueError, match="report malformed: nested too deeply"):
        parse_report(('{"version": 1, "x": ' + DEEP + "}").encode())


def test_a_deeply_nested_native_reading_is_refused_with_its_reason() -> None:
    payload = '{"ts": 1, "x": ' + DEEP + "}"
    with pytest.raises(Rejected, match="malformed: nested too deeply"):
        parse_reading(payload.encode(), NOW, OLDEST)


def test_a_device_may_report_back_the_largest_configuration_it_can_be_sent() -> None:
    # About the largest desired configuration the API takes (its body limit): every custom
    # key, long, with long values in two-byte characters; the device reports it back as it
    # applied it (as the original agent and the simulator do).
    custom = {f"k{i:02d}".ljust(64, "x"): "\u00e9" * 200 for i in range(32)}
    body = {"reporting_interval": 60, "heater_profile": "p" * 64, "custom": custom}
    assert len(msgspec.json.encode(body)) <= CONFIG_BODY_LIMIT
    report = parse_report(payload(desired_config(body), 7))
    assert report.version == 7 and json.loads(report.values)["custom"] == custom
