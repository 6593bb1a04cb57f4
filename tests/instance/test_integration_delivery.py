"""Integrations on a real instance app (its own Postgres database, its lifespan's sender, a
real receiver over HTTP): live readings and events arrive signed, a backfill replays a range
at its rate and resumes after a restart without a gap, a failed POST is retried rather than
skipped, and an event committed after a later one is not passed over."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from integration_steps import Receiver, instance_database, reading_rows, receiving, store
from litestar import Litestar, get

from libs.servers.ports import free_port
from services.instance import integration_events
from services.instance.app import create_instance_app
from services.instance.integrations import backfills
from services.instance.integrations.sender import IntegrationSender
from services.instance.integrations.store import (
    NewIntegration,
    create_integration,
    delete_integration,
    update_integration,
)
from services.instance.settings import InstanceSettings
from services.instance.webhook_targets import WebhookTargets
from support import eventually, license_keys_dir, serving, signed_license_issued

pytestmark = pytest.mark.slow

LOOPBACK = WebhookTargets.from_setting("127.0.0.0/8")


@pytest.fixture
async def database(postgres_server_url: str) -> str:
    return await instance_database(postgres_server_url)


@pytest.fixture
async def conn(database: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database, server_settings={"search_path": "instance"})
    yield connection
    await connection.close()


@contextlib.asynccontextmanager
async def control_plane() -> AsyncIterator[str]:
    """The licensing JWKS the instance checks its license against (the real keyring)."""
    from services.licensing.keys import load_keyring

    keyring = load_keyring(Path(license_keys_dir()))

    @get("/jwks")
    async def jwks() -> dict[str, Any]:
        return keyring.jwks()

    async with serving(Litestar([jwks])) as control:
        yield str(control.base_url)


def settings_for(database: str, control: str, customer_id: str) -> InstanceSettings:
    return msgspec.convert(
        {
            "instance_customer_id": customer_id,
            "database_url": database,
            "license_jwt": signed_license_issued(customer_id, plan="professional").jwt,
            "license_jwks_url": f"{control.rstrip('/')}/jwks",
            "control_plane_url": control,
            "mqtt_port": free_port(),  # no broker: ingest keeps trying, the rest goes on
            "alert_webhook_allowed_cidrs": "127.0.0.0/8",
        },
        InstanceSettings,
    )


async def integrate(
    conn: asyncpg.Connection, receiver: Receiver, kinds: list[str]
) -> dict[str, Any]:
    made = await create_integration(
        conn,
        NewIntegration(name=f"lake {uuid.uuid4().hex[:6]}", url=receiver.url, kinds=kinds),
        datetime.now(UTC),
    )
    receiver.secret = made["secret"]
    return made


async def test_live_readings_and_events_arrive_signed_and_survive_a_restart(
    database: str, conn: asyncpg.Connection
) -> None:
    customer_id = str(uuid.uuid4())
    now = datetime.now(UTC).replace(microsecond=0)
    await store(conn, reading_rows("d1", now - timedelta(hours=1), 5))  # before: not sent
    async with receiving() as receiver, control_plane() as control:
        made = await integrate(conn, receiver, ["readings", integration_events.ALERT])
        settings = settings_for(database, control, customer_id)
        async with serving(create_instance_app(settings)):
            await store(conn, reading_rows("d1", now, 3) + reading_rows("d2", now, 2))
            async with conn.transaction():
                await integration_events.enqueue(
                    conn, integration_events.ALERT, {"rule": "hot"}, now, "d1"
                )
                # A kind it did not subscribe to is not sent.
                await integration_events.enqueue(
                    conn, integration_events.QUOTA_NOTICE, {"meter": "devices"}, now
                )
            await eventually(
                lambda: asyncio.sleep(0, len(receiver.readings())),
                lambda n: n >= 5,
                timeout=30,
                what="the live readings delivered",
            )
            await eventually(
                lambda: asyncio.sleep(0, receiver.events()), timeout=30, what="the event"
            )
        # Stored while the instance is down: sent once it is back.
        later = now + timedelta(minutes=1)
        await store(conn, reading_rows("d2", later, 4))
        async with serving(create_instance_app(settings)):
            await eventually(
                lambda: asyncio.sleep(0, len(set(receiver.readings()))),
                lambda n: n >= 9,
                timeout=30,
                what="the readings stored while the instance was down",
            )
        shown = await conn.fetchrow(
            "SELECT failures, delivered_at FROM integrations WHERE integration_id = $1",
            made["integration_id"],
        )
    assert receiver.bad_signatures == 0
    expected = {
        (device, (start + timedelta(seconds=i)).isoformat())
        for device, start, count in (("d1", now, 3), ("d2", now, 2), ("d2", later, 4))
        for i in range(count)
    }
    assert set(receiver.readings()) == expected  # none from before it was made
    first = receiver.posts[0]
    assert first["customer_id"] == customer_id
    sent = next(r for p in receiver.posts if p["type"] == "readings" for r in p["readings"])
    assert sent["temperature"] == 20.5
    assert sent["calibrating"] is False
    assert [(e["kind"], e["device_id"], e["body"]) for e in receiver.events()] == [
        ("alert", "d1", {"rule": "hot"})
    ]
    assert shown["failures"] == 0
    assert shown["delivered_at"] is not None


async def test_a_backfill_resumes_after_a_restart_and_retries_a_failed_post(
    database: str, conn: asyncpg.Connection
) -> None:
    customer_id = str(uuid.uuid4())
    start = datetime(2026, 11, 1, 12, tzinfo=UTC)
    await store(conn, reading_rows("d1", start, 700) + reading_rows("d2", start, 500))
    await store(conn, reading_rows("d1", start - timedelta(days=2), 10))  # outside the range
    async with receiving() as receiver, control_plane() as control:
        made = await integrate(conn, receiver, ["readings"])
        integration_id = made["integration_id"]
        span = (start, start + timedelta(hours=1), 200)
        asked, new = await backfills.start_backfill(conn, integration_id, span, datetime.now(UTC))
        again, new_again = await backfills.start_backfill(
            conn, integration_id, span, datetime.now(UTC)
        )
        backfill_id = asked["backfill_id"]
        settings = settings_for(database, control, customer_id)
        async with serving(create_instance_app(settings)):
            await eventually(
                lambda: backfills.backfill_of(conn, integration_id, backfill_id),
                lambda b: b["done"] >= 400,
                timeout=60,
                what="the backfill part-way",
            )
        # Down: the receiver will refuse the next two POSTs once the instance is back.
        stopped_at = await backfills.backfill_of(conn, integration_id, backfill_id)
        receiver.refuse = 2
        async with serving(create_instance_app(settings)):
            failed = await eventually(
                lambda: backfills.backfill_of(conn, integration_id, backfill_id),
                lambda b: b["failures"] > 0,
                timeout=30,
                what="a refused page recorded",
            )
            done = await eventually(
                lambda: backfills.backfill_of(conn, integration_id, backfill_id),
                lambda b: b["state"] == "done",
                timeout=90,
                what="the backfill done",
            )
    assert (new, new_again, again["backfill_id"]) == (True, False, backfill_id)
    assert receiver.bad_signatures == 0
    assert stopped_at["state"] == "running"
    assert 400 <= stopped_at["done"] < 1200
    # The refused page was not skipped: the cursor stayed while it failed.
    assert failed["done"] == stopped_at["done"]
    assert failed["last_error"] == "answered 500"
    assert receiver.refused == 2
    sent = receiver.readings(backfill=backfill_id)
    expected = {
        (device, (start + timedelta(seconds=i)).isoformat())
        for device, count in (("d1", 700), ("d2", 500))
        for i in range(count)
    }
    assert set(sent) == expected  # every reading of the range, none outside it
    # At most the page in flight when the instance stopped came twice.
    assert len(sent) - len(expected) <= 200
    assert (done["done"], done["total"]) == (1200, 1200)
    shown = backfills.progress(done, datetime.now(UTC))
    assert shown["rate"] is not None
    assert shown["rate"] > 0
    assert receiver.readings() == []  # nothing live was stored meanwhile


async def test_an_event_committed_after_a_later_one_is_not_passed_over(
    database: str, conn: asyncpg.Connection
) -> None:
    async with receiving() as receiver:
        await integrate(conn, receiver, [integration_events.ALERT])
        pool = await asyncpg.create_pool(
            database, min_size=1, max_size=3, server_settings={"search_path": "instance"}
        )
        sender = IntegrationSender(lambda: pool, "c", lambda: True, targets=LOOPBACK, every=0)
        now = datetime.now(UTC)
        try:
            slow = conn.transaction()
            await slow.start()
            first = await integration_events.enqueue(conn, "alert", {"n": 1}, now, "d1")
            async with pool.acquire() as other:
                second = await integration_events.enqueue(other, "alert", {"n": 2}, now, "d1")
            await sender.send_due(datetime.now(UTC))
            await sender.settle(None)
            before = [e["id"] for e in receiver.events()]
            await slow.commit()
            await sender.send_due(datetime.now(UTC))
            await sender.settle(None)
        finally:
            await sender.stop()
            await pool.close()
    assert first < second
    assert before == []  # not sent while an earlier event could still commit
    assert [e["id"] for e in receiver.events()] == [first, second]


async def test_a_receiver_that_does_not_answer_holds_up_only_its_own_integration(
    database: str, conn: asyncpg.Connection
) -> None:
    async with receiving() as stuck, receiving() as healthy:
        stuck.hold = asyncio.Event()
        await integrate(conn, stuck, ["readings"])
        await integrate(conn, healthy, ["readings"])
        pool = await asyncpg.create_pool(
            database, min_size=1, max_size=3, server_settings={"search_path": "instance"}
        )
        sender = IntegrationSender(lambda: pool, "c", lambda: True, targets=LOOPBACK, every=0)
        now = datetime.now(UTC).replace(microsecond=0)

        async def pass_then_received() -> list[tuple[str, str]]:
            await sender.send_due(datetime.now(UTC))
            return healthy.readings()

        try:
            await store(conn, reading_rows("d1", now, 3))
            received = await eventually(
                pass_then_received, lambda sent: len(sent) == 3, what="the healthy receiver"
            )
            waiting = len(stuck.posts)
            stuck.hold.set()
            await eventually(
                pass_then_received, lambda _: len(stuck.readings()) == 3, what="the stuck one"
            )
        finally:
            await sender.stop()
            await pool.close()
    assert len(received) == 3
    assert waiting == 0


async def test_batches_of_readings_are_kept_only_while_an_integration_needs_them(
    database: str, conn: asyncpg.Connection
) -> None:
    batches = "SELECT count(*) FROM reading_batches"
    now = datetime.now(UTC).replace(microsecond=0)
    async with receiving() as receiver:
        # No integration takes readings: ingest writes nothing for them.
        await integrate(conn, receiver, [integration_events.ALERT])
        await store(conn, reading_rows("d1", now - timedelta(hours=1), 3))
        without = await conn.fetchval(batches)
        made = await integrate(conn, receiver, ["readings"])
        pool = await asyncpg.create_pool(
            database, min_size=1, max_size=3, server_settings={"search_path": "instance"}
        )
        sender = IntegrationSender(lambda: pool, "c", lambda: True, targets=LOOPBACK, every=0)
        try:
            await store(conn, reading_rows("d1", now, 3))
            await sender.send_due(datetime.now(UTC))
            await sender.settle(None)
            passed = (await conn.fetchval(batches), await sender.prune())
            receiver.refuse = 1
            await store(conn, reading_rows("d2", now, 2))
            await sender.send_due(datetime.now(UTC))
            await sender.settle(None)
            await sender.prune()
            waiting = await conn.fetchval(batches)
            await conn.execute("UPDATE reading_batches SET stored_at = now() - interval '31 days'")
            too_old = await sender.prune()
            await conn.execute(
                "UPDATE integrations SET next_at = now() WHERE integration_id = $1",
                made["integration_id"],
            )
            await sender.send_due(datetime.now(UTC))
            await sender.settle(None)
        finally:
            await sender.stop()
            await pool.close()
    assert without == 0
    assert passed == (1, 1)  # sent, then deleted
    assert waiting == 1  # refused: kept
    assert too_old == 1
    assert receiver.refused == 1
    assert sorted(receiver.readings()) == [
        ("d1", (now + timedelta(seconds=i)).isoformat()) for i in range(3)
    ]


async def test_a_receiver_answering_with_an_endless_body_is_a_delivery(
    database: str, conn: asyncpg.Connection
) -> None:
    async with receiving() as receiver:
        made = await create_integration(
            conn,
            NewIntegration(name="endless", url=receiver.endless_url, kinds=["alert"]),
            datetime.now(UTC),
        )
        pool = await asyncpg.create_pool(
            database, min_size=1, max_size=3, server_settings={"search_path": "instance"}
        )
        sender = IntegrationSender(lambda: pool, "c", lambda: True, targets=LOOPBACK, every=0)

        async def pass_then_state() -> asyncpg.Record:
            await sender.send_due(datetime.now(UTC))
            return await conn.fetchrow(
                "SELECT failures, delivered_at FROM integrations WHERE integration_id = $1",
                made["integration_id"],
            )

        try:
            await integration_events.enqueue(conn, "alert", {"n": 1}, datetime.now(UTC), "d1")
            # Well within the 30 s a POST may take: its body is never read.
            state = await eventually(
                pass_then_state, lambda s: s["delivered_at"] is not None, what="delivered"
            )
        finally:
            await sender.stop()
            await pool.close()
    assert state["failures"] == 0
    assert [e["body"] for e in receiver.events()] == [{"n": 1}]


async def test_ingest_notes_readings_only_while_an_integration_takes_them(
    conn: asyncpg.Connection,
) -> None:
    enabled = (
        "SELECT tgenabled <> 'D' FROM pg_trigger WHERE tgrelid = 'readings'::regclass "
        "AND tgname = 'readings_for_integrations'"
    )
    states = [await conn.fetchval(enabled)]
    async with receiving() as receiver:
        events = await integrate(conn, receiver, [integration_events.ALERT])
        states.append(await conn.fetchval(enabled))
        readings = await integrate(conn, receiver, ["readings"])
        states.append(await conn.fetchval(enabled))
        taken = NewIntegration(name="other", url=receiver.url, kinds=["alert"])
        await update_integration(conn, events["integration_id"], taken, False)
        states.append(await conn.fetchval(enabled))
        await delete_integration(conn, readings["integration_id"], datetime.now(UTC))
        states.append(await conn.fetchval(enabled))
        moved = NewIntegration(name="other", url=receiver.url, kinds=["alert", "readings"])
        await update_integration(conn, events["integration_id"], moved, False)
        states.append(await conn.fetchval(enabled))
    assert states == [False, False, True, True, False, True]
