"""A BME688's calibration followed at ingest, against a real Postgres: a new sensor's run from
stabilising to calibrated with the time it took, a drop back to 0 (a reset or a power cut)
starting a new run of a known sensor, every change kept and appended for the integrations,
readings delivered again or arriving late changing nothing, devices without BSEC fields left
unknown, and fleet devices (the original wire format) followed the same way, with the
temperature offset applied to them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from test_original_format_ingest import batch, fleet_ingest, message
from test_storage import database, ingest_for  # noqa: F401 - database is a fixture

from services.instance.calibration import (
    calibration_view,
    event_body,
    expected,
    first,
    fold,
    forget_old_changes,
    step,
)

pytestmark = pytest.mark.slow

# Readings' own times, days ago (within the retention, never in the future).
START = (datetime.now(UTC) - timedelta(days=5)).replace(second=0, microsecond=0)


def reading(at: datetime, accuracy: int | None) -> bytes:
    body: dict[str, Any] = {
        "ts": at.isoformat(),
        "temperature": 21.0,
        "humidity": 40,
        "pressure": 1000,
        "gas_resistance": 1e5,
    }
    if accuracy is not None:
        body |= {"iaq": 50, "iaq_accuracy": accuracy}
    return json.dumps(body).encode()


def minutes(n: float) -> datetime:
    return START + timedelta(minutes=n)


async def view(pool: asyncpg.Pool, device_id: str = "d1") -> dict[str, Any]:
    async with pool.acquire() as conn:
        return await calibration_view(conn, device_id, minutes(10_000))


async def events(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT kind, device_id, body FROM integration_events ORDER BY id")
    assert {r["kind"] for r in rows} <= {"calibration.changed"}
    return [json.loads(r["body"]) for r in rows]


async def test_a_new_sensor_calibrates_and_a_power_cut_starts_a_new_run(database) -> None:  # noqa: F811
    url, pool = database
    ingest, topic = await ingest_for(url, pool, CollectorRegistry())
    # The first batch: stabilising, then calibrating (1 and 2 are one state).
    for at, accuracy in ((0, 0), (1, 0), (2, 1), (3, 2), (4, 2)):
        ingest.receive(topic, reading(minutes(at), accuracy))
    assert await ingest.flush() == 5
    shown = await view(pool)
    assert (shown["state"], shown["iaq_accuracy"]) == ("calibrating", 2)
    assert shown["first_seen"] == shown["run_started"] == minutes(0)
    assert shown["since"] == minutes(2)
    assert shown["expected"]["sensor"] == "new"
    assert shown["expected"]["text"] == "usually 4 days for a new sensor"
    # Burn-in: accuracy 3 two days after the first reading.
    ingest.receive(topic, reading(minutes(2 * 1440), 3))
    ingest.receive(topic, reading(minutes(2 * 1440 + 1), 3))
    await ingest.flush()
    shown = await view(pool)
    assert (shown["state"], shown["since"], shown["expected"]) == (
        "calibrated",
        minutes(2 * 1440),
        None,
    )
    assert [r["seconds_to_calibrated"] for r in shown["runs"]] == [2 * 86400]
    # A power cut: back to 0 (a drop), then a known sensor settles within minutes.
    for at, accuracy in ((3000, 0), (3005, 1), (3020, 3)):
        ingest.receive(topic, reading(minutes(at), accuracy))
        if at == 3000:
            await ingest.flush()
            dropped = await view(pool)
            assert (dropped["state"], dropped["drops"]) == ("stabilising", 1)
            assert dropped["run_started"] == minutes(3000)
            assert dropped["expected"]["sensor"] == "known"
            assert "power cycle" in dropped["expected"]["text"]
    await ingest.flush()
    shown = await view(pool)
    assert shown["state"] == "calibrated" and shown["drops"] == 1
    runs = shown["runs"]
    assert [(r["started_at"], r["seconds_to_calibrated"], r["ended_at"]) for r in runs] == [
        (minutes(3000), 20 * 60, None),
        (minutes(0), 2 * 86400, minutes(3000)),
    ]
    assert [(c["from"], c["to"], c["dropped"]) for c in reversed(shown["changes"])] == [
        ("unknown", "stabilising", False),
        ("stabilising", "calibrating", False),
        ("calibrating", "calibrated", False),
        ("calibrated", "stabilising", True),
        ("stabilising", "calibrating", False),
        ("calibrating", "calibrated", False),
    ]
    told = await events(pool)
    assert [(e["from"], e["to"], e["dropped"]) for e in told] == [
        (c["from"], c["to"], c["dropped"]) for c in reversed(shown["changes"])
    ]
    assert told[3] == {
        "device_id": "d1",
        "at": minutes(3000).isoformat(),
        "from": "calibrated",
        "to": "stabilising",
        "iaq_accuracy": 0,
        "dropped": True,
        "run_started": minutes(3000).isoformat(),
        "seconds_to_calibrated": None,
    }
    # Reaching 3 tells how long the run took.
    assert [e["seconds_to_calibrated"] for e in told if e["to"] == "calibrated"] == [
        2 * 86400,
        20 * 60,
    ]


async def test_readings_again_or_late_change_nothing(database) -> None:  # noqa: F811
    url, pool = database
    ingest, topic = await ingest_for(url, pool, CollectorRegistry())
    sent = [reading(minutes(at), accuracy) for at, accuracy in ((0, 1), (1, 2), (2, 3))]
    for body in sent:
        ingest.receive(topic, body)
    await ingest.flush()
    before = await view(pool)
    # The same readings delivered again (the broker delivers at least once), and a reading
    # older than the newest taken into account, arriving late with another accuracy.
    for body in sent:
        ingest.receive(topic, body)
    ingest.receive(topic, reading(minutes(1.5), 0))
    assert await ingest.flush() == 1
    after = await view(pool)
    assert after == before
    assert after["state"] == "calibrated" and len(after["changes"]) == 2
    # A batch that changes no accuracy still moves the newest reading taken into account.
    ingest.receive(topic, reading(minutes(3), 3))
    ingest.receive(topic, reading(minutes(4), 3))
    await ingest.flush()
    assert (await view(pool))["last_reading"] == minutes(4)
    ingest.receive(topic, reading(minutes(3.5), 0))
    await ingest.flush()
    assert (await view(pool))["changes"] == after["changes"]
    assert len(await events(pool)) == 2


async def test_readings_without_bsec_leave_a_device_unknown(database) -> None:  # noqa: F811
    url, pool = database
    ingest, topic = await ingest_for(url, pool, CollectorRegistry())
    for at in range(3):
        ingest.receive(topic, reading(minutes(at), None))
    assert await ingest.flush() == 3
    shown = await view(pool)
    assert (shown["state"], shown["runs"], shown["changes"], shown["expected"]) == (
        "unknown",
        [],
        [],
        None,
    )
    assert await events(pool) == []
    # A device that had BSEC and stops sending it keeps what it had.
    ingest.receive(topic, reading(minutes(3), 3))
    ingest.receive(topic, reading(minutes(4), None))
    await ingest.flush()
    assert (await view(pool))["state"] == "calibrated"


async def test_a_fleet_device_in_the_original_format_is_followed(database) -> None:  # noqa: F811
    url, pool = database
    ingest, topic, _ = await fleet_ingest(url, pool)
    now = datetime.now(UTC).replace(microsecond=0)
    # Its desired configuration corrects self-heating: the offset applied shows with it.
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO device_config (device_id, desired, version, desired_at) "
            "VALUES ('f1', '{\"temperature_offset\": -1.5}', 1, now())"
        )
    ingest.config_changed("f1")
    await ingest.flush()  # loads the offsets for the readings taken next
    ingest.receive(
        topic,
        batch(
            *(
                message(now - timedelta(minutes=10 - i), iaq=40, iaq_accuracy=accuracy)
                for i, accuracy in enumerate((0, 0, 1, 3))
            )
        ),
    )
    assert await ingest.flush() == 4
    shown = await view(pool, "f1")
    assert (shown["state"], shown["temperature_offset"]) == ("calibrated", -1.5)
    assert [r["seconds_to_calibrated"] for r in shown["runs"]] == [3 * 60]
    assert len(await events(pool)) == 3


def test_the_fold_takes_each_batch_in_time_order_and_flapping_is_no_drop() -> None:
    tracked, change = first("d", START, 3)
    assert change.to_state == "calibrated" and tracked.run_calibrated == START
    assert event_body(change)["seconds_to_calibrated"] == 0  # calibrated from its first reading
    # 3 -> 2 -> 3: calibrating for a while, the same run; 2 -> 1 is no change of state.
    points = [("d", minutes(1), 2), ("d", minutes(2), 1), ("d", minutes(3), 3)]
    folded = fold({"d": tracked}, points)
    assert [(c.from_state, c.to_state) for c in folded.changes] == [
        ("calibrated", "calibrating"),
        ("calibrating", "calibrated"),
    ]
    after = folded.tracked["d"]
    assert (after.drops, after.run_started, after.run_calibrated) == (0, START, START)
    assert folded.runs == {}
    # Stabilising at the start is no drop either: it was never at 1 or more in this run.
    zero, _ = first("z", START, 0)
    again, change2 = step(zero, minutes(1), 0)
    assert change2 is None and again.drops == 0
    assert expected(again, minutes(5 * 1440))["longer_than_usual"] is False
    assert expected(again, minutes(9 * 1440))["longer_than_usual"] is True


async def test_a_failed_write_takes_its_calibration_back_and_the_retry_tells_it_once(
    database,  # noqa: F811
) -> None:
    url, pool = database
    ingest, topic = await ingest_for(url, pool, CollectorRegistry())
    for at, accuracy in ((0, 0), (1, 1), (2, 3)):
        ingest.receive(topic, reading(minutes(at), accuracy))
    # The write fails after the calibration was followed (the usage counters come later).
    async with pool.acquire() as conn:
        await conn.execute(
            "ALTER TABLE usage_days ADD CONSTRAINT refuse_all CHECK (mqtt_messages < 0)"
        )
    with pytest.raises(asyncpg.CheckViolationError):
        await ingest.flush()
    assert (await view(pool))["state"] == "unknown"
    assert await events(pool) == []
    async with pool.acquire() as conn:
        await conn.execute("ALTER TABLE usage_days DROP CONSTRAINT refuse_all")
    assert await ingest.flush() == 3
    shown = await view(pool)
    assert shown["state"] == "calibrated" and len(shown["changes"]) == 3
    assert [(e["from"], e["to"]) for e in await events(pool)] == [
        ("unknown", "stabilising"),
        ("stabilising", "calibrating"),
        ("calibrating", "calibrated"),
    ]


async def test_history_older_than_the_retention_goes_and_the_state_stays(database) -> None:  # noqa: F811
    url, pool = database
    ingest, topic = await ingest_for(url, pool, CollectorRegistry())
    for at, accuracy in ((0, 3), (1, 0), (2000, 3)):
        ingest.receive(topic, reading(minutes(at), accuracy))
    await ingest.flush()
    async with pool.acquire() as conn:
        await forget_old_changes(conn, minutes(1000))
    shown = await view(pool)
    assert (shown["state"], shown["first_seen"], shown["drops"]) == ("calibrated", START, 1)
    assert [c["at"] for c in shown["changes"]] == [minutes(2000)]
    assert [r["started_at"] for r in shown["runs"]] == [minutes(1)]  # the run going on


async def test_a_sensor_flapping_every_reading_is_kept_change_by_change(database) -> None:  # noqa: F811
    url, pool = database
    ingest, topic = await ingest_for(url, pool, CollectorRegistry())
    # A broken sensor (or a hostile device) swinging between 3 and 0 with each reading: each
    # swing is a change, each 0 a drop and a new run, all written in one batch.
    for at in range(1000):
        ingest.receive(topic, reading(START + timedelta(seconds=at), 3 if at % 2 == 0 else 0))
    assert await ingest.flush() == 1000
    shown = await view(pool)
    assert (shown["state"], shown["drops"]) == ("stabilising", 500)
    async with pool.acquire() as conn:
        changes = await conn.fetchval("SELECT count(*) FROM calibration_changes")
        runs = await conn.fetch("SELECT * FROM calibration_runs ORDER BY started_at")
    assert changes == 1000 and len(runs) == 501
    assert all(r["calibrated_at"] == r["started_at"] + timedelta(seconds=1) for r in runs[1:-1])
    assert runs[-1]["ended_at"] is None
    told = await events(pool)
    assert len(told) == 1000
    assert told[-1]["at"] == (START + timedelta(seconds=999)).isoformat() and told[-1]["dropped"]
