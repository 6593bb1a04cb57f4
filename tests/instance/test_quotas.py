"""Quotas that explain themselves, on a real Postgres: the readings' token bucket (a burst
cannot spend the day, and a restart does not refill it), what a limit refused recorded per
device and minute with one ``quota.limited`` event a minute, and the notices at 80% and 100%
of each meter, once per day (devices: once per crossing), each with its ``quota.notice``."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from prometheus_client import CollectorRegistry
from test_storage import body, database, ingest_for  # noqa: F401 - database is a fixture

from libs.servers.ports import free_port
from services.instance.ingest import Ingest, IngestMetrics
from services.instance.quota_notices import Meter, QuotaWatch, current_notices, notice_levels
from services.instance.quotas import (
    API_LIMIT,
    BURST,
    DAILY_BUDGET,
    TokenBucket,
    bucket_shape,
    forget_old_refusals,
    limited_spans,
    note_refused,
    record_refusals,
)
from services.instance.settings import InstanceSettings

NOON = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def test_a_busy_hour_cannot_spend_the_day() -> None:
    daily = 100_000
    capacity, refill = bucket_shape(daily)
    assert capacity == daily // 12 and refill == daily / 86_400
    bucket = TokenBucket.full(daily, NOON)
    # A device flooding for an hour, a reading every 10 ms: what the bucket lets through.
    taken = sum(bucket.take(NOON + timedelta(milliseconds=10 * i)) for i in range(360_000))
    assert taken < daily // 8  # the burst plus an hour's refill, not the day
    assert taken >= capacity + int(refill * 3600) - 1
    # Quiet for a while, it refills at the day's average rate, up to its capacity only.
    quiet = NOON + timedelta(milliseconds=3_600_000 + 600_000)
    assert abs(bucket.level_at(quiet) - 600 * refill) < 2
    assert bucket.level_at(NOON + timedelta(days=3)) == capacity


def test_a_small_budget_is_one_bucket_and_a_new_license_reshapes_it() -> None:
    assert bucket_shape(300) == (300.0, 300 / 86_400)  # never more than the day
    assert bucket_shape(5000)[0] == 1000  # one batch of the original agent fits
    bucket = TokenBucket.full(100_000, NOON)
    bucket.reshape(1000)
    assert (bucket.capacity, bucket.level) == (1000, 1000)
    bucket.level = 0
    bucket.reshape(1_000_000)
    assert bucket.level == 0  # an upgrade does not hand out a new burst at once
    assert not bucket.take(NOON)


async def test_a_burst_over_the_bucket_is_dropped_recorded_and_survives_a_restart(
    database,  # noqa: F811
) -> None:
    url, pool = database
    ingest, topic = await ingest_for(url, pool, CollectorRegistry())
    now = datetime.now(UTC)
    ingest.bucket = TokenBucket.full(100_000, now)
    ingest.bucket.level = 2.5  # as if a burst had just emptied it
    for index in range(6):
        ingest.receive(topic, body(now - timedelta(seconds=index), 20 + index))
    assert await ingest.flush() == 2
    async with pool.acquire() as conn:
        usage = await conn.fetchrow("SELECT * FROM usage_days")
        limited = await conn.fetch("SELECT * FROM quota_limited")
        events = await conn.fetch("SELECT * FROM integration_events WHERE kind = 'quota.limited'")
        saved = await conn.fetchrow("SELECT * FROM quota_bucket")
    assert (usage["mqtt_messages"], usage["over_quota_readings"]) == (2, 4)
    assert [(r["meter"], r["device_id"], r["count"], r["what"]) for r in limited] == [
        (BURST, "d1", 4, "readings")
    ]
    assert len(events) == 1 and events[0]["device_id"] == "d1"
    assert '"meter": "burst"' in events[0]["body"] and '"count": 4' in events[0]["body"]
    assert saved["level"] < 1
    # More refused in the same minute add to its row: no second row, no second event.
    ingest.receive(topic, body(now - timedelta(seconds=30)))
    await ingest.flush()
    async with pool.acquire() as conn:
        counts = await conn.fetch("SELECT count FROM quota_limited")
        again = await conn.fetchval(
            "SELECT count(*) FROM integration_events WHERE kind = 'quota.limited'"
        )
    # (one row and one event a minute: two if the minute turned in between)
    assert sum(r["count"] for r in counts) == 5 and again == len(counts) <= 2
    # A restart takes the bucket up where it was: still (nearly) empty, not full.
    restarted = Ingest(
        ingest._settings, lambda: pool, ingest._license, IngestMetrics(CollectorRegistry())
    )
    await restarted.load_usage()
    restarted.receive(topic, body(now - timedelta(seconds=40)))
    restarted.receive(topic, body(now - timedelta(seconds=41)))
    assert restarted.bucket is not None and restarted.bucket.capacity == 100_000 // 12
    assert restarted.bucket.level < 3


async def test_the_daily_budget_names_itself_apart_from_the_burst(database) -> None:  # noqa: F811
    url, pool = database
    ingest, topic = await ingest_for(url, pool, CollectorRegistry())
    ingest.accepted_today = 100_000
    now = datetime.now(UTC)
    ingest.receive(topic, body(now))
    await ingest.flush()
    async with pool.acquire() as conn:
        names = {r["device_id"]: "Kitchen" for r in await conn.fetch("SELECT * FROM devices")}
        spans = await limited_spans(conn, now - timedelta(hours=1), names)
    assert [(s["meter"], s["count"], s["limit"]) for s in spans] == [(DAILY_BUDGET, 1, 100_000)]
    assert spans[0]["summary"] == "device Kitchen: 1 reading refused, daily budget 100,000 used"
    assert spans[0]["message"].startswith("device Kitchen: 1 reading refused ")


async def test_consecutive_minutes_are_one_span_and_a_gap_starts_another(database) -> None:  # noqa: F811
    _, pool = database
    refusals: dict = {}
    for minute in (0, 1, 2, 3, 7):
        for _ in range(10):
            note_refused(refusals, BURST, "d1", NOON + timedelta(minutes=minute, seconds=5), 9, "x")
    note_refused(refusals, BURST, "d2", NOON + timedelta(minutes=1), 9, "readings")
    async with pool.acquire() as conn, conn.transaction():
        await record_refusals(conn, refusals)
    async with pool.acquire() as conn:
        spans = await limited_spans(conn, NOON - timedelta(hours=1), {})
        events = await conn.fetchval("SELECT count(*) FROM integration_events")
    assert [(s["device_id"], s["count"], f"{s['from']:%M}", f"{s['to']:%M}") for s in spans] == [
        ("d1", 10, "07", "07"),
        ("d2", 1, "01", "01"),
        ("d1", 40, "00", "03"),
    ]
    assert events == 6  # one a device and minute


async def notices(conn: asyncpg.Connection, meter: Meter, at: datetime) -> list[int]:
    async with conn.transaction():
        return await notice_levels(conn, meter, at)


async def test_daily_meters_notice_80_and_100_once_a_day(database) -> None:  # noqa: F811
    _, pool = database
    async with pool.acquire() as conn:
        assert await notices(conn, Meter("mqtt_messages", 79_999, 100_000, True), NOON) == []
        assert await notices(conn, Meter("mqtt_messages", 80_000, 100_000, True), NOON) == [80]
        assert await notices(conn, Meter("mqtt_messages", 90_000, 100_000, True), NOON) == []
        # Straight past both at once: only what is new.
        assert await notices(conn, Meter("api_requests", 10_000, 10_000, True), NOON) == [80, 100]
        assert await notices(conn, Meter("api_requests", 10_001, 10_000, True), NOON) == []
        shown = await current_notices(conn, NOON)
        tomorrow = NOON + timedelta(days=1)
        assert await current_notices(conn, tomorrow) == []
        assert await notices(conn, Meter("mqtt_messages", 85_000, 100_000, True), tomorrow) == [80]
        bodies = await conn.fetch(
            "SELECT body->>'meter' AS meter, (body->>'level')::int AS level "
            "FROM integration_events WHERE kind = 'quota.notice' ORDER BY id"
        )
    assert {(n["meter"], n["level"]) for n in shown} == {
        ("mqtt_messages", 80),
        ("api_requests", 100),
    }
    assert "Limit reached: 10,000 of 10,000 API requests" in next(
        n["message"] for n in shown if n["meter"] == "api_requests"
    )
    assert [(b["meter"], b["level"]) for b in bodies] == [
        ("mqtt_messages", 80),
        ("api_requests", 80),
        ("api_requests", 100),
        ("mqtt_messages", 80),
    ]


async def test_devices_notice_once_per_crossing(database) -> None:  # noqa: F811
    _, pool = database
    async with pool.acquire() as conn:
        assert await notices(conn, Meter("devices", 8, 10, False), NOON) == [80]
        assert await notices(conn, Meter("devices", 9, 10, False), NOON) == []
        # The next day changes nothing for devices: the same crossing.
        assert await notices(conn, Meter("devices", 8, 10, False), NOON + timedelta(days=1)) == []
        assert len(await current_notices(conn, NOON + timedelta(days=1))) == 1
        # Back below 80% (a device removed): the notice no longer holds, and a new crossing
        # is noticed again.
        assert await notices(conn, Meter("devices", 7, 10, False), NOON + timedelta(days=2)) == []
        assert await current_notices(conn, NOON + timedelta(days=2)) == []
        later = NOON + timedelta(days=3)
        assert await notices(conn, Meter("devices", 10, 10, False), later) == [80, 100]
        count = await conn.fetchval("SELECT count(*) FROM quota_notices WHERE meter = 'devices'")
    assert count == 3


async def test_refused_api_requests_are_counted_and_survive_a_failed_write(
    database,  # noqa: F811
) -> None:
    url, pool = database
    ingest, _ = await ingest_for(url, pool, CollectorRegistry())
    now = datetime.now(UTC)
    for _ in range(3):
        ingest.refused(API_LIMIT, now, 10_000, "API requests")
    async with pool.acquire() as conn:
        await conn.execute("ALTER TABLE quota_limited RENAME TO quota_limited_away")
    with pytest.raises(asyncpg.UndefinedTableError):
        await ingest.flush()
    async with pool.acquire() as conn:
        await conn.execute("ALTER TABLE quota_limited_away RENAME TO quota_limited")
    ingest.refused(API_LIMIT, now, 10_000, "API requests")
    await ingest.flush()  # the failed batch's refusals with the new one, once
    await ingest.flush()
    async with pool.acquire() as conn:
        spans = await limited_spans(conn, now - timedelta(hours=1), {})
        events = await conn.fetchval("SELECT count(*) FROM integration_events")
    assert [(s["meter"], s["device_id"], s["count"]) for s in spans] == [(API_LIMIT, None, 4)]
    assert spans[0]["summary"] == "4 API requests refused, daily limit of 10,000 API requests used"
    assert events == 1


async def test_a_notice_the_control_plane_did_not_take_waits_for_the_next_turn(
    database,  # noqa: F811
) -> None:
    url, pool = database
    settings = InstanceSettings(
        instance_customer_id=str(uuid.uuid4()),
        database_url=url,
        usage_url=f"http://127.0.0.1:{free_port()}",  # nothing listens: billing is away
        usage_token="t" * 40,
        license_jwks_url="http://127.0.0.1:9/jwks",  # not used here
    )
    readings = 80_000
    watch = QuotaWatch(
        settings, lambda: pool, lambda devices: [Meter("mqtt_messages", readings, 100_000, True)]
    )
    assert await watch.check(NOON) == [("mqtt_messages", 80)]
    assert await watch.check(NOON) == []  # unchanged: not looked at again
    with pytest.raises(httpx.ConnectError):
        await watch.report()
    with pytest.raises(httpx.ConnectError):
        await watch.report()  # still waiting, asked again
    async with pool.acquire() as conn:
        waiting = await conn.fetchval(
            "SELECT count(*) FROM quota_notices WHERE reported_at IS NULL"
        )
    assert waiting == 1


async def test_refusals_past_the_retention_are_forgotten(database) -> None:  # noqa: F811
    _, pool = database
    refusals: dict = {}
    now = datetime.now(UTC)
    for days in (0, 89, 91):
        note_refused(refusals, BURST, "d1", now - timedelta(days=days), 9, "readings")
    async with pool.acquire() as conn:
        async with conn.transaction():
            await record_refusals(conn, refusals)
        assert await forget_old_refusals(conn, 90) == 1
        left = await conn.fetchval("SELECT count(*) FROM quota_limited")
    assert left == 2
