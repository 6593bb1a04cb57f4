"""The mail outbox against a real SMTP server (a small one this test runs on loopback) and a
real Postgres: delivered once, across an outage of the server, and its body not kept."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import pytest

from libs.db.postgres import create_pool
from libs.mail.outbox import MailRelay, queue_mail, read_mail
from libs.mail.smtp import Mail, MailNotSent, MailTransport, SmtpServer
from libs.servers.ports import free_port
from support import eventually

TABLE_SQL = """
CREATE TABLE mail_outbox (
    id bigserial PRIMARY KEY,
    recipient text NOT NULL,
    subject text NOT NULL,
    body text,
    created_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    sent_at timestamptz,
    delivered_by text,
    given_up_at timestamptz
)
"""


@dataclass
class SmtpSink:
    """A minimal SMTP server (RFC 5321's commands a client sends one mail with): keeps what it
    is given, offers no STARTTLS."""

    port: int
    received: list[tuple[str, list[str], bytes]] = field(default_factory=list)
    server: asyncio.Server | None = None
    # Answer every RCPT with 550, as a server does for a mailbox that does not exist.
    refuse_recipients: bool = False

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sender, recipients = "", []

        async def say(line: str) -> None:
            writer.write(f"{line}\r\n".encode())
            await writer.drain()

        await say("220 sink ESMTP")
        while line := (await reader.readline()).decode().rstrip("\r\n"):
            verb = line.split(" ", 1)[0].upper()
            if verb == "EHLO":
                await say("250-sink\r\n250 8BITMIME")
            elif verb == "HELO" or verb in ("RSET", "NOOP"):
                await say("250 ok")
            elif verb == "MAIL":
                sender = line.partition(":")[2].strip()
                await say("250 ok")
            elif verb == "RCPT" and self.refuse_recipients:
                await say("550 5.1.1 no such mailbox")
            elif verb == "RCPT":
                recipients.append(line.partition(":")[2].strip())
                await say("250 ok")
            elif verb == "DATA":
                await say("354 go on")
                data = b""
                while (chunk := await reader.readline()) != b".\r\n":
                    data += chunk
                self.received.append((sender, recipients, data))
                await say("250 queued")
            elif verb == "QUIT":
                await say("221 bye")
                break
            else:
                await say("502 not here")
        writer.close()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    conn = await asyncpg.connect(database_url)
    await conn.execute("DROP SCHEMA IF EXISTS mailtest CASCADE; CREATE SCHEMA mailtest")
    await conn.execute(TABLE_SQL.replace("mail_outbox", "mailtest.mail_outbox"))
    await conn.close()
    pool = await create_pool(database_url, "mailtest")
    try:
        yield pool
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def running(relay: MailRelay) -> AsyncIterator[None]:
    task = asyncio.create_task(relay.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


MAIL = Mail(to="ada@example.com", subject="Reset your password", body="https://x/reset?token=t")


async def test_a_mail_waits_out_a_server_that_is_down_and_is_delivered_once(pool) -> None:
    sink = SmtpSink(free_port())
    server = SmtpServer(host="127.0.0.1", port=sink.port, starttls=False, sender="p@example.com")
    relay = MailRelay(lambda: pool, MailTransport(server), poll_seconds=0.2)
    async with pool.acquire() as conn:
        mail_id = await queue_mail(conn, MAIL)
    async with running(relay):
        # Nobody listens yet: the try fails, is counted, and waits.
        row = await eventually(
            lambda: pool.fetchrow("SELECT * FROM mail_outbox WHERE id = $1", mail_id),
            lambda r: r["attempts"] >= 1,
            what="a failed try",
        )
        assert row["sent_at"] is None and "Error" in row["last_error"]
        assert row["next_attempt_at"] > row["created_at"]
        await sink.start()
        try:
            row = await eventually(
                lambda: pool.fetchrow("SELECT * FROM mail_outbox WHERE id = $1", mail_id),
                lambda r: r["sent_at"] is not None,
                what="the mail sent once the server is up",
            )
            await asyncio.sleep(0.5)  # a few more polls: nothing is sent again
        finally:
            await sink.stop()
    assert len(sink.received) == 1
    sender, recipients, data = sink.received[0]
    assert sender == "<p@example.com>" and recipients == ["<ada@example.com>"]
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message["Subject"] == "Reset your password"
    assert "token=t" in message.get_content()
    # Sent over SMTP, the one-time link is not kept.
    assert row["body"] is None and row["delivered_by"] == "smtp"
    async with pool.acquire() as conn:
        [kept] = await read_mail(conn, "mailtest")
    assert kept.body is None


async def test_without_starttls_from_the_server_nothing_goes_in_clear(pool) -> None:
    sink = SmtpSink(free_port())
    await sink.start()
    try:
        transport = MailTransport(SmtpServer(host="127.0.0.1", port=sink.port, starttls=True))
        with pytest.raises(MailNotSent, match="STARTTLS"):
            await transport.deliver(MAIL)
    finally:
        await sink.stop()
    assert sink.received == []


async def test_without_a_server_mail_is_written_to_the_log_and_kept(pool, caplog) -> None:
    relay = MailRelay(lambda: pool, MailTransport(None), poll_seconds=0.2)
    async with pool.acquire() as conn:
        await queue_mail(conn, MAIL)
    caplog.set_level("INFO", logger="libs.mail.smtp")
    async with running(relay):
        await eventually(
            lambda: pool.fetchval("SELECT sent_at FROM mail_outbox"), what="the mail written"
        )
    async with pool.acquire() as conn:
        [kept] = await read_mail(conn, "mailtest")
    assert kept.body == MAIL.body and kept.delivered_by == "log"
    [line] = [r.getMessage() for r in caplog.records if "mail not sent" in r.getMessage()]
    # The subject, not the address: a log line outlives an erasure (mail tail shows the rest).
    assert "ada@example.com" not in line and "Reset your password" in line
    assert "token" not in line  # the link stays out of the log


async def test_a_mail_refused_for_good_is_given_up_at_once_and_its_link_dropped(pool) -> None:
    sink = SmtpSink(free_port(), refuse_recipients=True)
    server = SmtpServer(host="127.0.0.1", port=sink.port, starttls=False, sender="p@example.com")
    relay = MailRelay(lambda: pool, MailTransport(server), poll_seconds=0.2)
    async with pool.acquire() as conn:
        mail_id = await queue_mail(conn, MAIL)
    await sink.start()
    try:
        async with running(relay):
            row = await eventually(
                lambda: pool.fetchrow("SELECT * FROM mail_outbox WHERE id = $1", mail_id),
                lambda r: r["given_up_at"] is not None,
                what="the refused mail given up",
            )
            await asyncio.sleep(1)  # the relay polls five times more: no other try
            again = await pool.fetchrow("SELECT * FROM mail_outbox WHERE id = $1", mail_id)
    finally:
        await sink.stop()
    assert (row["attempts"], again["attempts"]) == (1, 1)
    assert row["sent_at"] is None and row["body"] is None
    assert "550" in row["last_error"]
    assert sink.received == []
    async with pool.acquire() as conn:
        [kept] = await read_mail(conn, "mailtest", mail_id - 1, 1)
    assert kept.given_up_at is not None


async def test_a_mail_nobody_took_for_days_is_given_up_not_tried_for_ever(pool) -> None:
    """Its links expired long ago: the next failed try is the last."""
    server = SmtpServer(host="127.0.0.1", port=free_port(), starttls=False, sender="p@x.example")
    relay = MailRelay(lambda: pool, MailTransport(server), poll_seconds=0.2)
    async with pool.acquire() as conn:
        old = await queue_mail(conn, MAIL)
        fresh = await queue_mail(conn, MAIL)
        await conn.execute(
            "UPDATE mail_outbox SET created_at = now() - interval '4 days' WHERE id = $1", old
        )
    async with running(relay):
        await eventually(
            lambda: pool.fetch("SELECT * FROM mail_outbox ORDER BY id"),
            lambda rows: all(r["attempts"] >= 1 for r in rows),
            what="a try at each",
        )
    rows = {r["id"]: r for r in await pool.fetch("SELECT * FROM mail_outbox")}
    assert rows[old]["given_up_at"] is not None and rows[old]["body"] is None
    assert rows[fresh]["given_up_at"] is None and rows[fresh]["body"] == MAIL.body
