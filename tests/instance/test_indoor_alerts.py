"""The indoor-air alerts against a real instance database: the presets every instance gets
(once: a deleted one stays deleted), mould risk, dew point, a stale sensor, CO₂ and a device
offline, each firing with why and resolving, readings taken before calibration left out unless a
rule asks for them, and each firing in the integrations' outbox. The alert loop's pass is run
directly at chosen times (``AlertEngine.evaluate(now)``) over readings stored with those times.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from libs.db.postgres import create_pool, load_migrations, migrate
from libs.http.errors import InvalidRequest
from services.instance.alerts.engine import AlertEngine
from services.instance.alerts.presets import install_presets
from services.instance.alerts.rules import create_rule, delete_rule, parse_rule
from services.instance.readings import store_readings
from support import create_database

NOW = datetime(2026, 6, 13, 12, 0, tzinfo=UTC)
MIGRATIONS = load_migrations("services.instance.migrations", "service")


@pytest.fixture
async def pool(postgres_server_url: str) -> AsyncIterator[asyncpg.Pool]:
    url = await create_database(postgres_server_url)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, "instance", MIGRATIONS)
    finally:
        await conn.close()
    made = await create_pool(url, "instance", max_size=2)
    try:
        yield made
    finally:
        await made.close()


def engine(pool: asyncpg.Pool) -> AlertEngine:
    return AlertEngine(lambda: pool, "customer-1", lambda: True)


async def add_device(conn: asyncpg.Connection, device_id: str, last_seen: datetime | None) -> None:
    await conn.execute(
        "INSERT INTO devices (device_id, name, mqtt_username, created_at, last_seen) "
        "VALUES ($1, $1, $1, $2, $3)",
        device_id,
        NOW - timedelta(days=3),
        last_seen,
    )


async def add_readings(
    conn: asyncpg.Connection,
    device_id: str,
    start: datetime,
    end: datetime,
    every: timedelta,
    **values: Any,
) -> int:
    """Readings from ``start`` to ``end`` (inclusive); a value may be a function of the
    reading's number."""
    fields = {
        "temperature": 21.0,
        "humidity": 45.0,
        "pressure": 1013.0,
        "gas_resistance": 1e5,
        "iaq": 50.0,
        "iaq_accuracy": 3,
        "co2_equivalent": 600.0,
    } | values
    rows, ts, i = [], start, 0
    while ts <= end:
        v = {k: f(i) if callable(f) else f for k, f in fields.items()}
        rows.append(
            (
                device_id,
                ts,
                v["temperature"],
                v["humidity"],
                v["pressure"],
                v["gas_resistance"],
                v["iaq"],
                v["iaq_accuracy"],
                v["co2_equivalent"],
                0.5,
                None,
            )
        )
        ts, i = ts + every, i + 1
    async with conn.transaction():
        await store_readings(conn, rows, set())
    return len(rows)


async def rule_id(conn: asyncpg.Connection, preset: str) -> str:
    return str(await conn.fetchval("SELECT rule_id FROM alert_presets WHERE preset = $1", preset))


async def events(conn: asyncpg.Connection, rule: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT device_id, event, explanation, evidence::text AS evidence, value "
        "FROM alert_history WHERE rule_id = $1 ORDER BY id",
        rule,
    )


async def test_presets_are_installed_once_and_a_deleted_one_stays_deleted(pool) -> None:
    async with pool.acquire() as conn:
        assert await install_presets(conn) == ["offline", "mould_risk", "stale_sensor", "co2_high"]
        rules = await conn.fetch(
            "SELECT kind, params::text AS params, muted, include_calibrating, preset "
            "FROM alert_rules WHERE deleted_at IS NULL ORDER BY kind"
        )
        assert [(r["kind"], r["preset"], r["muted"]) for r in rules] == [
            ("co2_high", "co2_high", False),
            ("mould_risk", "mould_risk", False),
            ("offline", "offline", False),
            ("stale_sensor", "stale_sensor", False),
        ]
        assert json.loads(rules[0]["params"]) == {"ppm_above": 1000, "minutes": 30}
        assert not any(r["include_calibrating"] for r in rules)
        assert await install_presets(conn) == []  # a restart installs nothing again
        assert await delete_rule(conn, await rule_id(conn, "mould_risk"))
        # Neither a restart nor the migrations again bring it back.
        assert await install_presets(conn) == []
        assert await migrate(conn, "instance", MIGRATIONS) == []
        kinds = await conn.fetch("SELECT kind FROM alert_rules WHERE deleted_at IS NULL")
    assert sorted(r["kind"] for r in kinds) == ["co2_high", "offline", "stale_sensor"]


async def test_rules_made_before_the_upgrade_keep_looking_at_every_reading(
    postgres_server_url: str,
) -> None:
    conn = await asyncpg.connect(await create_database(postgres_server_url))
    try:
        await migrate(conn, "instance", [m for m in MIGRATIONS if int(m.version) < 11])
        await conn.execute(
            "INSERT INTO instance.alert_rules (rule_id, name, metric, operator, threshold, "
            "for_seconds, devices, created_at) "
            "VALUES ('old', 'old', 'iaq', '>', 150, 0, '{}', now())"
        )
        await migrate(conn, "instance", MIGRATIONS)
        old = await conn.fetchrow(
            "SELECT kind, include_calibrating FROM instance.alert_rules WHERE rule_id = 'old'"
        )
    finally:
        await conn.close()
    assert (old["kind"], old["include_calibrating"]) == ("threshold", True)


async def test_mould_risk_fires_with_why_and_resolves(pool) -> None:
    async with pool.acquire() as conn:
        await install_presets(conn)
        await add_device(conn, "cellar", NOW)
        start = NOW - timedelta(hours=25)
        # RH 72 to 78% every 10 minutes for 25 h (still calibrated: accuracy 3).
        await add_readings(
            conn, "cellar", start, NOW, timedelta(minutes=10), humidity=lambda i: 72 + i % 7
        )
        mould = await rule_id(conn, "mould_risk")
    assert await engine(pool).evaluate(NOW) == 1
    assert await engine(pool).evaluate(NOW + timedelta(seconds=2)) == 0  # nothing new
    async with pool.acquire() as conn:
        fired = await events(conn, mould)
        state = await conn.fetchrow("SELECT * FROM alert_states WHERE rule_id = $1", mould)
        outbox = await conn.fetch(
            "SELECT kind, device_id, body::text AS body FROM integration_events"
        )
        # The air dries: one reading at 60% ends it.
        later = NOW + timedelta(minutes=10)
        await add_readings(conn, "cellar", later, later, timedelta(minutes=1), humidity=60.0)
        await conn.execute("UPDATE devices SET last_seen = $1", later)
    assert [(e["device_id"], e["event"]) for e in fired] == [("cellar", "firing")]
    why = fired[0]["explanation"]
    # The window the test's readings make: the first 15 min fall before the look-back.
    assert why.startswith("RH 72 to 78% for 24 h"), why
    assert why.endswith("(threshold 70% for 24 h)"), why
    evidence = json.loads(fired[0]["evidence"])
    assert evidence["part"] == "humidity" and evidence["low"] == 72 and evidence["high"] == 78
    assert evidence["readings"] >= 24 * 6
    # The state goes on saying how long it has lasted.
    assert state["state"] == "firing"
    assert state["explanation"].startswith("RH 72 to 78% for 24 h 10 min"), state["explanation"]
    assert [(o["kind"], o["device_id"]) for o in outbox] == [("alert", "cellar")]
    body = json.loads(outbox[0]["body"])
    assert body["event"] == "firing" and body["kind"] == "mould_risk"
    assert body["explanation"] == why
    assert await engine(pool).evaluate(later) == 1
    async with pool.acquire() as conn:
        done = await events(conn, mould)
        count = await conn.fetchval("SELECT count(*) FROM integration_events")
    assert [e["event"] for e in done] == ["firing", "resolved"]
    assert done[1]["explanation"].startswith("RH 60% at 06-13 12:10 UTC"), done[1]["explanation"]
    assert count == 2


async def test_a_gap_in_the_readings_breaks_continuously(pool) -> None:
    async with pool.acquire() as conn:
        await install_presets(conn)
        await add_device(conn, "attic", NOW)
        # 25 h of damp air, but nothing at all for two hours in the middle.
        await add_readings(
            conn,
            "attic",
            NOW - timedelta(hours=25),
            NOW - timedelta(hours=13),
            timedelta(minutes=10),
            humidity=lambda i: 80 + i % 3,
        )
        await add_readings(
            conn,
            "attic",
            NOW - timedelta(hours=11),
            NOW,
            timedelta(minutes=10),
            humidity=lambda i: 80 + i % 3,
        )
        mould = await rule_id(conn, "mould_risk")
    assert await engine(pool).evaluate(NOW) == 0
    async with pool.acquire() as conn:
        state = await conn.fetchrow("SELECT * FROM alert_states WHERE rule_id = $1", mould)
    assert state["state"] == "pending"
    assert state["since"] == NOW - timedelta(hours=11)
    assert state["explanation"].startswith("so far RH 80 to 82% for 11 h"), state["explanation"]


async def test_dew_point_near_the_surface_fires_where_a_surface_temperature_is_given(pool) -> None:
    async with pool.acquire() as conn:
        await install_presets(conn)
        await add_device(conn, "wall", NOW)
        await add_device(conn, "room", NOW)
        await conn.execute(
            "INSERT INTO device_config (device_id, desired, version, desired_at) "
            "VALUES ('wall', $1::jsonb, 1, now())",
            json.dumps({"custom": {"surface_temperature": 12}}),
        )
        # 20 °C at 65% RH: dew point 13.2 °C, within 2 °C of a 12 °C wall.
        for device in ("wall", "room"):
            await add_readings(
                conn,
                device,
                NOW - timedelta(minutes=5),
                NOW,
                timedelta(minutes=5),
                temperature=20.0,
                humidity=65.0,
            )
        mould = await rule_id(conn, "mould_risk")
    assert await engine(pool).evaluate(NOW) == 1
    async with pool.acquire() as conn:
        fired = await events(conn, mould)
    assert [e["device_id"] for e in fired] == ["wall"]  # the room has no surface given
    assert fired[0]["explanation"].startswith(
        "dew point 13.2 to 13.2 °C, within 2 °C of the surface at 12 °C"
    ), fired[0]["explanation"]


async def test_readings_before_calibration_are_left_out_unless_a_rule_asks(pool) -> None:
    async with pool.acquire() as conn:
        await install_presets(conn)
        await add_device(conn, "office", NOW)
        # 40 min at 1,500 ppm, while BSEC was still calibrating (accuracy 1).
        await add_readings(
            conn,
            "office",
            NOW - timedelta(minutes=40),
            NOW,
            timedelta(minutes=1),
            co2_equivalent=1500.0,
            iaq_accuracy=1,
        )
        preset = await rule_id(conn, "co2_high")
        rule = await parse_rule(
            {"kind": "co2_high", "name": "CO2 raw", "include_calibrating": True}, False
        )
        asking = (await create_rule(conn, rule))["rule_id"]
    assert await engine(pool).evaluate(NOW) == 1
    async with pool.acquire() as conn:
        assert await events(conn, preset) == []
        fired = await events(conn, asking)
    assert fired[0]["explanation"] == (
        "CO₂-equivalent 1500 to 1500 ppm for 30 min since 06-13 11:20 UTC "
        "(threshold 1000 ppm for 30 min)"
    )


async def test_a_frozen_sensor_is_stale(pool) -> None:
    async with pool.acquire() as conn:
        await install_presets(conn)
        await add_device(conn, "frozen", NOW)
        await add_device(conn, "alive", NOW)
        await add_readings(conn, "frozen", NOW - timedelta(hours=4), NOW, timedelta(minutes=5))
        await add_readings(
            conn,
            "alive",
            NOW - timedelta(hours=4),
            NOW,
            timedelta(minutes=5),
            pressure=lambda i: 1013.0 + (i % 2) / 10,
        )
        stale = await rule_id(conn, "stale_sensor")
    await engine(pool).evaluate(NOW)
    async with pool.acquire() as conn:
        fired = await events(conn, stale)
        states = await conn.fetch(
            "SELECT device_id, state FROM alert_states WHERE rule_id = $1 ORDER BY device_id",
            stale,
        )
    assert [e["device_id"] for e in fired] == ["frozen"]
    # A working sensor's newest reading is a run of one: nothing pending about it.
    assert [(s["device_id"], s["state"]) for s in states] == [("frozen", "firing")]
    assert fired[0]["explanation"].startswith(
        "temperature 21 °C, RH 45%, pressure 1013 hPa and gas 100000 Ω unchanged in"
    ), fired[0]["explanation"]


async def test_offline_counts_the_devices_own_reporting_interval(pool) -> None:
    async with pool.acquire() as conn:
        await install_presets(conn)
        four_minutes_ago = NOW - timedelta(minutes=4)
        await add_device(conn, "fast", four_minutes_ago)  # every 30 s: 2.5 min is too long
        await add_device(conn, "slow", four_minutes_ago)  # the default 60 s: 5 min
        await add_device(conn, "unboxed", None)  # never sent anything: not offline
        await conn.execute(
            "INSERT INTO device_config (device_id, desired, version, desired_at) "
            "VALUES ('fast', '{\"reporting_interval\": 30}', 1, now())"
        )
        offline = await rule_id(conn, "offline")
    assert await engine(pool).evaluate(NOW) == 1
    async with pool.acquire() as conn:
        fired = await events(conn, offline)
        await conn.execute("UPDATE devices SET last_seen = $1 WHERE device_id = 'fast'", NOW)
    assert [e["device_id"] for e in fired] == ["fast"]
    assert fired[0]["explanation"] == (
        "no data since 06-13 11:56 UTC (4 min; threshold 5 times the 30 s reporting interval "
        "= 2 min 30 s)"
    )
    assert await engine(pool).evaluate(NOW + timedelta(seconds=2)) == 1
    async with pool.acquire() as conn:
        done = await events(conn, offline)
    assert [e["event"] for e in done] == ["firing", "resolved"]


async def test_rules_of_a_kind_are_checked_field_by_field() -> None:
    for body, field in (
        ({"kind": "mould"}, "kind"),
        ({"kind": "co2_high", "params": {"ppm": 900}}, "params.ppm"),
        ({"kind": "co2_high", "params": {"ppm_above": -1}}, "params.ppm_above"),
        ({"kind": "co2_high", "params": {"minutes": 2.5}}, "params.minutes"),
        ({"kind": "co2_high", "params": {"minutes": "30"}}, "params.minutes"),
        ({"kind": "offline", "params": {"missed_intervals": 10**400}}, "params.missed_intervals"),
        (
            {"kind": "mould_risk", "params": {"humidity_above": float("nan")}},
            "params.humidity_above",
        ),
        ({"kind": "mould_risk", "params": []}, "params"),
        ({"kind": "stale_sensor", "metric": "humidity"}, "metric"),
        ({"kind": "stale_sensor", "include_calibrating": "yes"}, "include_calibrating"),
    ):
        with pytest.raises(InvalidRequest) as refused:
            await parse_rule(body, False)
        assert field in [f["field"] for f in refused.value.fields or []], (body, refused.value)
    rule = await parse_rule(
        {"kind": "mould_risk", "params": {"humidity_above": 65, "surface_temperature": 11.5}},
        False,
    )
    assert rule.params == {
        "humidity_above": 65.0,
        "humidity_hours": 24,
        "dew_point_margin": 2,
        "dew_point_minutes": 0,
        "surface_temperature": 11.5,
    }


async def test_a_threshold_rule_leaves_out_readings_before_calibration_too(pool) -> None:
    async with pool.acquire() as conn:
        await add_device(conn, "lab", NOW)
        await add_readings(
            conn,
            "lab",
            NOW - timedelta(minutes=2),
            NOW,
            timedelta(minutes=1),
            iaq=300.0,
            iaq_accuracy=0,
        )
        made = {}
        for name, include in (("plain", False), ("asking", True)):
            rule = await parse_rule(
                {
                    "name": name,
                    "metric": "iaq",
                    "operator": ">",
                    "threshold": 150,
                    "include_calibrating": include,
                },
                False,
            )
            made[name] = (await create_rule(conn, rule))["rule_id"]
    assert await engine(pool).evaluate(NOW) == 1
    async with pool.acquire() as conn:
        assert await events(conn, made["plain"]) == []
        fired = await events(conn, made["asking"])
    assert fired[0]["explanation"] == (
        "iaq 300 > 150 in the newest reading (06-13 12:00 UTC), met since 06-13 12:00 UTC "
        "(threshold > 150 for 0 s)"
    )
