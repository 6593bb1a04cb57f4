"""Quota notices by mail: an instance's meter reached 80% or 100% of its license's limit
(``QuotaNoticeReported``, which billing appends from the instance's report), and signup mails
the account's address.

A reactor (never replayed: a rebuilt account view mails nobody) queues the mail in the same
transaction as a row keyed on the event's id (``quota_notice_mails``) and its checkpoint, so a
notice delivered again is mailed once. A closed account is not mailed, nor a notice older than
``MAX_AGE`` when the reactor first sees it (it was down for days: the dashboard shows what
holds now), nor more than ``MAX_MAILS_PER_DAY`` a day to one customer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from contracts import QuotaNoticeReported
from libs.db.postgres import Connection
from libs.mail.outbox import queue_mail
from libs.mail.smtp import Mail
from libs.projections.apply import Projection, Recorded

log = logging.getLogger(__name__)

REACTOR = "quota_notice_mails"
MAX_AGE = timedelta(days=2)
# Three meters at two levels make six honest notices a day; past this many notices in a day to
# one customer, a notice is recorded but not mailed (a broken or forged instance cannot flood
# the customer's inbox through us).
MAX_MAILS_PER_DAY = 12
METERS = {
    "devices": ("devices registered", "New devices are refused until one is removed"),
    "mqtt_messages": ("readings of today's budget", "Readings are dropped until midnight UTC"),
    "api_requests": ("API requests of today", "API requests are refused until midnight UTC"),
}


def quota_mail(to: str, e: QuotaNoticeReported) -> Mail:
    """The mail of one notice."""
    what, then = METERS.get(e.meter, (e.meter, "More is refused"))
    reached = "has reached its limit" if e.level >= 100 else f"is at {e.level}% of its limit"
    return Mail(
        to=to,
        subject=f"Iotistic: your instance {reached} ({e.meter.replace('_', ' ')})",
        body=(
            f"Your Iotistic instance {reached}: {e.used:,} of {e.limit:,} {what} "
            f"({e.period}).\n\n"
            + (f"{then}.\n\n" if e.level >= 100 else f"At 100%: {then[0].lower()}{then[1:]}.\n\n")
            + 'The dashboard\'s "Usage and license" section shows the meters live and what '
            "was refused (GET /api/quotas and /api/quotas/limited). A larger plan raises the "
            "limits.\n"
        ),
    )


async def when_quota_noticed_mail_customer(
    conn: Connection, r: Recorded[QuotaNoticeReported]
) -> None:
    """Mail the account's address about the notice, once."""
    e = r.event
    if e.noticed_at < datetime.now(UTC) - MAX_AGE:
        return
    mailed_today = await conn.fetchval(
        "SELECT count(*) FROM quota_notice_mails "
        "WHERE customer_id = $1 AND mailed_at > now() - interval '1 day'",
        e.customer_id,
    )
    first = await conn.fetchval(
        "INSERT INTO quota_notice_mails (event_id, customer_id) VALUES ($1, $2) "
        "ON CONFLICT (event_id) DO NOTHING RETURNING true",
        str(r.envelope.event_id),
        e.customer_id,
    )
    if not first:
        return
    if mailed_today >= MAX_MAILS_PER_DAY:
        log.warning("quota notice for %s not mailed: %d mailed today", e.customer_id, mailed_today)
        return
    account = await conn.fetchrow(
        "SELECT email, closed_at FROM accounts WHERE customer_id = $1", e.customer_id
    )
    if account is not None and account["closed_at"] is not None:
        return
    email = (
        account["email"]
        if account is not None
        # The account view may lag the log; the credentials are written at signup.
        else await conn.fetchval(
            "SELECT email FROM credentials WHERE customer_id = $1 AND confirmed", e.customer_id
        )
    )
    if email is None:
        log.warning("quota notice for unknown customer %s: not mailed", e.customer_id)
        return
    await queue_mail(conn, quota_mail(email, e))


def quota_mail_reactors(wake_mail: Callable[[], None]) -> list[Projection]:
    """The reactor that mails quota notices."""
    return [
        Projection(
            name=REACTOR,
            tables=(),
            handlers={QuotaNoticeReported: when_quota_noticed_mail_customer},
            after_commit=wake_mail,
        )
    ]
