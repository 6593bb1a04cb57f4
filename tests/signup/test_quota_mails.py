"""Signup's quota mails on a real Postgres (the reactor's handler called as the runner calls it):
one mail per notice however often it is delivered, the account's address or else the confirmed
credentials', nothing for a closed account or a stale notice, and no more than
``MAX_MAILS_PER_DAY`` a day to one customer, whatever an instance reports."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from contracts import QuotaNoticeReported, new_envelope
from libs.db.postgres import load_migrations, migrate
from libs.projections.apply import Recorded
from services.signup.quota_mails import MAX_MAILS_PER_DAY, when_quota_noticed_mail_customer
from support import create_database


@pytest.fixture
async def conn(postgres_server_url: str) -> AsyncIterator[asyncpg.Connection]:
    url = await create_database(postgres_server_url)
    connection = await asyncpg.connect(url)
    try:
        await migrate(
            connection, "signup", load_migrations("services.signup.migrations", "service")
        )
        await connection.execute("SET search_path TO signup")
        yield connection
    finally:
        await connection.close()


def notice(customer_id: str, level: int = 80, period: str = "2026-12-07", **changes) -> Recorded:
    event = QuotaNoticeReported(
        customer_id=customer_id,
        meter=changes.get("meter", "mqtt_messages"),
        level=level,
        used=changes.get("used", 80_000),
        limit=100_000,
        period=period,
        noticed_at=changes.get("noticed_at", datetime.now(UTC)),
    )
    return Recorded(seq=1, envelope=new_envelope(event, customer_id=customer_id), event=event)


async def account(conn: asyncpg.Connection, email: str, closed: bool = False) -> str:
    customer_id = str(uuid.uuid4())
    await conn.execute(
        "INSERT INTO accounts (customer_id, email, email_display, company_name, signed_up_at, "
        "plan, updated_at, closed_at) VALUES ($1, $2, $2, 'Air Co', now(), 'starter', now(), $3)",
        customer_id,
        email,
        datetime.now(UTC) if closed else None,
    )
    return customer_id


async def mails(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(await conn.fetch("SELECT recipient, subject, body FROM mail_outbox ORDER BY id"))


async def apply(conn: asyncpg.Connection, recorded: Recorded) -> None:
    async with conn.transaction():
        await when_quota_noticed_mail_customer(conn, recorded)


async def test_a_notice_is_mailed_once_to_the_account_however_often_it_comes(conn) -> None:
    customer_id = await account(conn, "ada@example.com")
    recorded = notice(customer_id)
    for _ in range(3):  # redelivered, or appended again past JetStream's duplicate window
        await apply(conn, recorded)
    sent = await mails(conn)
    assert [(m["recipient"], m["subject"]) for m in sent] == [
        ("ada@example.com", "Iotistic: your instance is at 80% of its limit (mqtt messages)")
    ]
    assert "80,000 of 100,000 readings of today's budget (2026-12-07)" in sent[0]["body"]
    assert "At 100%: readings are dropped until midnight UTC." in sent[0]["body"]
    await apply(conn, notice(customer_id, level=100, used=100_000))
    full = (await mails(conn))[-1]
    assert full["subject"] == "Iotistic: your instance has reached its limit (mqtt messages)"
    assert "Readings are dropped until midnight UTC." in full["body"]


async def test_no_mail_for_a_closed_account_a_stale_notice_or_a_stranger(conn) -> None:
    closed = await account(conn, "gone@example.com", closed=True)
    await apply(conn, notice(closed))
    live = await account(conn, "late@example.com")
    await apply(conn, notice(live, noticed_at=datetime.now(UTC) - timedelta(days=3)))
    await apply(conn, notice(str(uuid.uuid4())))  # no account, no credentials
    assert await mails(conn) == []


async def test_credentials_stand_in_for_an_account_view_that_lags(conn) -> None:
    customer_id = str(uuid.uuid4())
    await conn.execute(
        "INSERT INTO credentials (customer_id, email, password_hash, confirmed) "
        "VALUES ($1, 'new@example.com', 'not-a-hash', true)",
        customer_id,
    )
    await apply(conn, notice(customer_id, meter="devices", used=8))
    assert [m["recipient"] for m in await mails(conn)] == ["new@example.com"]


async def test_an_instance_cannot_flood_the_inbox(conn) -> None:
    customer_id = await account(conn, "flood@example.com")
    for index in range(MAX_MAILS_PER_DAY + 5):
        await apply(conn, notice(customer_id, period=f"forged {index}"))
    assert len(await mails(conn)) == MAX_MAILS_PER_DAY
