"""The mail outbox: mails kept in the service's database until delivered, then relayed by one
supervised task, so sending never blocks or fails the request that decided it.

``queue_mail`` inserts a mail in the caller's transaction (it is sent only if that commits).
``MailRelay`` takes due mails one at a time (``FOR UPDATE SKIP LOCKED``: replicas share the
work, never a mail), delivers each through a ``MailTransport``, and marks it sent; a mail the
server would not take waits with jittered exponential backoff, capped, and is tried again,
across restarts too: nothing is lost, and a mail marked sent is not sent again. A mail the
server refuses for good (its recipient does not exist), or still not taken ``GIVE_UP_DAYS``
after it was written (every link it carries has expired by then), is given up: marked, its
body dropped, and a warning logged; ``iotistic mail tail`` shows why. Sent over SMTP,
a mail's body is dropped (it may hold a one-time link); written to the log instead, it is kept
for ``iotistic mail tail`` until ``forget_sent_mail`` trims it. The table, in the service's
schema::

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
    );
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from libs.db.postgres import CONNECTION_ERRORS
from libs.mail.smtp import Mail, MailNotSent, MailTransport
from libs.runtime.supervision import Worker, beat

log = logging.getLogger(__name__)

TABLE = "mail_outbox"
# The longest wait between tries at one mail while the server is down.
MAX_BACKOFF_SECONDS = 600.0
FIRST_BACKOFF_SECONDS = 2.0
# A relay pass that has not finished for this long is stuck (readiness says so).
RELAY_STUCK_SECONDS = 300.0
# A mail not taken this long after it was written is given up (its links have expired).
GIVE_UP_DAYS = 3


async def queue_mail(conn: asyncpg.Connection, mail: Mail) -> int:
    """Keep ``mail`` for the relay, in the caller's transaction; returns its id."""
    return int(
        await conn.fetchval(
            f"INSERT INTO {TABLE} (recipient, subject, body) VALUES ($1, $2, $3) RETURNING id",
            mail.to,
            mail.subject,
            mail.body,
        )
    )


def backoff_seconds(attempts: int) -> float:
    """How long a mail waits after its ``attempts``-th failed try: doubling, capped, jittered."""
    base = min(FIRST_BACKOFF_SECONDS * 2 ** max(attempts - 1, 0), MAX_BACKOFF_SECONDS)
    return float(base * random.uniform(0.8, 1.2))  # noqa: S311 - jitter, not a secret


class MailRelay:
    """Delivers the outbox's due mails; ``wake()`` after a commit to send at once."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool],
        transport: MailTransport,
        poll_seconds: float = 1.0,
    ) -> None:
        """``pool`` gives the service's pool (its schema holds the table)."""
        self._pool = pool
        self.transport = transport
        self._poll = poll_seconds
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look for due mail now rather than at the next poll."""
        self._wake.set()

    async def send_one(self) -> bool:
        """Deliver the oldest due mail, if any; True when there was one (sent or not)."""
        async with self._pool().acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT id, recipient, subject, body, attempts, "
                f"created_at < now() - make_interval(days => {GIVE_UP_DAYS}) AS stale "
                f"FROM {TABLE} WHERE sent_at IS NULL AND given_up_at IS NULL "
                "AND next_attempt_at <= now() "
                "ORDER BY next_attempt_at, id LIMIT 1 FOR UPDATE SKIP LOCKED"
            )
            if row is None:
                return False
            mail = Mail(to=row["recipient"], subject=row["subject"], body=row["body"] or "")
            try:
                await self.transport.deliver(mail)
            except MailNotSent as exc:
                attempts = row["attempts"] + 1
                if exc.permanent or row["stale"]:
                    log.warning(
                        "mail %d to %s given up after %d tries: %s",
                        row["id"],
                        row["recipient"],
                        attempts,
                        exc,
                    )
                    await conn.execute(
                        f"UPDATE {TABLE} SET attempts = $2, last_error = $3, body = NULL, "
                        "given_up_at = now() WHERE id = $1",
                        row["id"],
                        attempts,
                        str(exc)[:500],
                    )
                    return True
                wait = backoff_seconds(attempts)
                log.warning(
                    "mail %d to %s not sent (try %d): %s; next try in %.0fs",
                    row["id"],
                    row["recipient"],
                    attempts,
                    exc,
                    wait,
                )
                await conn.execute(
                    f"UPDATE {TABLE} SET attempts = $2, last_error = $3, "
                    "next_attempt_at = now() + make_interval(secs => $4) WHERE id = $1",
                    row["id"],
                    attempts,
                    str(exc)[:500],
                    wait,
                )
                return True
            # Sent: over SMTP the body (a one-time link) is not kept; written to the log, the
            # table is where the mail is read.
            keep_body = self.transport.delivered_by == "log"
            await conn.execute(
                f"UPDATE {TABLE} SET sent_at = now(), attempts = attempts + 1, last_error = NULL, "
                "delivered_by = $2, body = CASE WHEN $3 THEN body END WHERE id = $1",
                row["id"],
                self.transport.delivered_by,
                keep_body,
            )
            return True

    async def run(self) -> None:
        """Deliver for ever: at once when woken, else every ``poll_seconds``; a database away
        is waited out. Each pass beats, so a relay hung on a server shows as stuck."""
        while True:
            self._wake.clear()
            try:
                while await self.send_one():
                    beat()
            except CONNECTION_ERRORS as exc:
                log.warning("mail relay: database not reachable (%r); retrying", exc)
            beat()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll)

    def worker(self) -> Worker:
        """The supervised task that runs this relay."""
        return Worker("mail relay", self.run, stuck_after=RELAY_STUCK_SECONDS)


async def forget_sent_mail(pool: asyncpg.Pool, keep_days: int = 7) -> int:
    """Drop mails sent more than ``keep_days`` ago; returns how many."""
    deleted = await pool.fetch(
        f"DELETE FROM {TABLE} WHERE sent_at < now() - make_interval(days => $1) RETURNING id",
        keep_days,
    )
    return len(deleted)


@dataclass(frozen=True)
class KeptMail:
    """A mail as the outbox holds it, for ``iotistic mail tail``."""

    id: int
    recipient: str
    subject: str
    body: str | None
    created_at: datetime
    sent_at: datetime | None
    delivered_by: str | None
    attempts: int
    last_error: str | None
    given_up_at: datetime | None


async def read_mail(
    conn: asyncpg.Connection, schema: str, after_id: int = 0, limit: int = 100
) -> list[KeptMail]:
    """Mails of ``schema``'s outbox with ids above ``after_id``, oldest first."""
    rows = await conn.fetch(
        f"SELECT id, recipient, subject, body, created_at, sent_at, delivered_by, attempts, "
        f"last_error, given_up_at FROM {_quoted(schema)}.{TABLE} WHERE id > $1 "
        "ORDER BY id LIMIT $2",
        after_id,
        limit,
    )
    return [KeptMail(**dict(row)) for row in rows]


async def last_mail_ids(conn: asyncpg.Connection, schema: str, count: int) -> int:
    """The id just before the last ``count`` mails of ``schema``'s outbox (0 if fewer)."""
    value = await conn.fetchval(
        f"SELECT id FROM {_quoted(schema)}.{TABLE} ORDER BY id DESC OFFSET $1 LIMIT 1", count
    )
    return int(value or 0)


def _quoted(schema: str) -> str:
    if not schema.replace("_", "").isalnum():
        raise ValueError(f"not a schema name: {schema!r}")
    return f'"{schema}"'
