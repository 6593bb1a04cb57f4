"""Integrations when the database goes away under a running instance (cut through a TCP relay,
as a Postgres restart or a network fault does): the backfill under way and the live readings
resume from their persisted positions once it is back, with no reading missing."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from fleet_fault_steps import MONITORING, running_instance
from integration_steps import reading_rows, receiving, store
from tcp_relay import TcpRelay

from libs.servers.mosquitto import EmbeddedMosquitto
from services.instance.integrations import backfills
from services.instance.integrations.store import NewIntegration, create_integration
from support import eventually

pytestmark = pytest.mark.slow


async def test_a_database_outage_mid_backfill_loses_and_skips_nothing(
    postgres_server_url: str, broker: EmbeddedMosquitto
) -> None:
    relay = TcpRelay(postgres_server_url)
    start = datetime(2026, 10, 1, 8, tzinfo=UTC)
    async with (
        relay,
        receiving() as receiver,
        running_instance(
            postgres_server_url,
            broker,
            database_port=relay.port,
            alert_webhook_allowed_cidrs="127.0.0.0/8",
        ) as inst,
    ):
        db = inst.db
        await store(db, reading_rows("d1", start, 600) + reading_rows("d2", start, 600))
        made = await create_integration(
            db,
            NewIntegration(name="lake", url=receiver.url, kinds=["readings"]),
            datetime.now(UTC),
        )
        receiver.secret = made["secret"]
        integration_id = made["integration_id"]
        asked, _ = await backfills.start_backfill(
            db, integration_id, (start, start + timedelta(hours=1), 300), datetime.now(UTC)
        )
        backfill_id = asked["backfill_id"]
        await eventually(
            lambda: backfills.backfill_of(db, integration_id, backfill_id),
            lambda b: b["done"] >= 300,
            timeout=30,
            what="the backfill under way",
        )
        relay.go_down()
        await eventually(
            lambda: inst.http.get("/health/ready", headers=MONITORING),
            lambda r: r.status_code == 503,
            what="readiness saying the database is away",
        )
        # Stored meanwhile (the test's connection goes around the relay).
        now = datetime.now(UTC).replace(microsecond=0)
        await store(db, reading_rows("d3", now, 7))
        away_at = await backfills.backfill_of(db, integration_id, backfill_id)
        relay.come_back()
        done = await eventually(
            lambda: backfills.backfill_of(db, integration_id, backfill_id),
            lambda b: b["state"] == "done",
            timeout=60,
            what="the backfill done after the outage",
        )
        live = await eventually(
            lambda: asyncio.sleep(0, receiver.readings()),
            lambda sent: len(set(sent)) == 7,
            timeout=30,
            what="the readings stored during the outage sent live",
        )
    assert away_at["state"] == "running"
    assert away_at["done"] < 1200
    sent = receiver.readings(backfill=backfill_id)
    expected = {
        (device, (start + timedelta(seconds=i)).isoformat())
        for device in ("d1", "d2")
        for i in range(600)
    }
    assert set(sent) == expected
    assert len(sent) - len(expected) <= 300  # at most the page in flight when it went away
    assert (done["done"], done["total"]) == (1200, 1200)
    assert set(live) == {("d3", (now + timedelta(seconds=i)).isoformat()) for i in range(7)}
    assert receiver.bad_signatures == 0
