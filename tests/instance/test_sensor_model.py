"""The simulator's sensor model: a daily cycle, noise, IAQ episodes, always valid readings."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from services.instance.readings import parse_reading
from services.instance.simulate import SensorModel


def test_a_simulated_week_is_realistic_and_every_reading_is_valid() -> None:
    model = SensorModel(seed=7)
    start = datetime(2026, 11, 23, tzinfo=UTC)
    by_hour: dict[int, list[float]] = {}
    peaks = 0
    for minute in range(7 * 24 * 60):
        now = start + timedelta(minutes=minute)
        reading = model.next(now)
        ts, parsed = parse_reading(json.dumps(reading).encode(), now, now - timedelta(days=1))
        assert ts == now
        by_hour.setdefault(now.hour, []).append(parsed.temperature)
        peaks += parsed.iaq is not None and parsed.iaq > 100
    warmest = max(by_hour, key=lambda h: sum(by_hour[h]) / len(by_hour[h]))
    coldest = min(by_hour, key=lambda h: sum(by_hour[h]) / len(by_hour[h]))
    assert 13 <= warmest <= 17 and (coldest <= 5 or coldest >= 23)
    assert peaks > 0  # at least one IAQ episode in a week
