"""The last events about each customer, for the operators' customers page.

Signup's bus credentials let it consume only through its own durable consumers, never read the
log by subject (``libs/eventlog/bus_auth.py``), so a customer's history is projected like any
view: one row per event about a customer (its type, time and a one-line summary), the newest
``KEPT_PER_CUSTOMER`` kept. The summary names ids, states, amounts and times; it leaves out
personal data (emails, names, company names), the license token, Stripe's facts and anything
whose name suggests a secret, and cuts long values short.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any

import asyncpg
import msgspec

from contracts import Event
from contracts.events import ALL_EVENTS
from libs.db.postgres import Connection
from libs.projections.apply import Projection, Recorded

KEPT_PER_CUSTOMER = 50
VALUE_MAX = 80
SUMMARY_MAX = 400
# Fields never shown: personal data, the license token, Stripe's facts and the invoice's page
# (whoever has its address can read the invoice), and values that would only repeat the row.
HIDDEN_FIELDS = frozenset(
    {
        "customer_id",
        "email",
        "email_display",
        "full_name",
        "company_name",
        "jwt",
        "payload",
        "facts",
        "hosted_invoice_url",
    }
)
SECRET_NAME = re.compile(r"passw|pwd|hash|secret|token|private|api_?key|signing", re.I)
_SCALARS = (str, int, float, bool, date, datetime)


def _shown(value: Any) -> str:
    text = value.isoformat() if isinstance(value, date | datetime) else str(value)
    text = " ".join(text.split())  # no line breaks or runs of spaces in a one-line summary
    return text if len(text) <= VALUE_MAX else text[: VALUE_MAX - 1] + "…"


def summary_of(event: Event) -> str:
    """``name=value`` of the event's plain fields that may be shown, in declaration order."""
    parts = []
    for field in msgspec.structs.fields(type(event)):
        name = field.encode_name
        if name in HIDDEN_FIELDS or SECRET_NAME.search(name):
            continue
        value = getattr(event, field.name)
        if value is None or not isinstance(value, _SCALARS):
            continue
        parts.append(f"{name}={_shown(value)}")
    text = ", ".join(parts)
    return text if len(text) <= SUMMARY_MAX else text[: SUMMARY_MAX - 1] + "…"


async def when_anything_happens_note_it(conn: Connection, r: Recorded[Event]) -> None:
    customer_id = r.envelope.customer_id
    if not customer_id:
        return  # about the platform (its capacity, say), not about one customer
    await conn.execute(
        "INSERT INTO customer_events (customer_id, seq, event_type, occurred_at, summary) "
        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        customer_id,
        r.seq,
        r.envelope.type,
        r.envelope.occurred_at,
        summary_of(r.event),
    )
    # Only the newest are kept: what is older than the last one kept goes.
    await conn.execute(
        "DELETE FROM customer_events WHERE customer_id = $1 AND seq < ("
        "  SELECT seq FROM customer_events WHERE customer_id = $1"
        "  ORDER BY seq DESC OFFSET $2 LIMIT 1)",
        customer_id,
        KEPT_PER_CUSTOMER - 1,
    )


CUSTOMER_EVENTS = Projection(
    name="customer_events",
    tables=("customer_events",),
    handlers={cls: when_anything_happens_note_it for cls in ALL_EVENTS},
)


async def last_events(
    pool: asyncpg.Pool, customer_id: str, limit: int = KEPT_PER_CUSTOMER
) -> list[asyncpg.Record]:
    """The customer's newest events first: ``seq``, ``event_type``, ``occurred_at``,
    ``summary``."""
    return list(
        await pool.fetch(
            "SELECT seq, event_type, occurred_at, summary FROM customer_events "
            "WHERE customer_id = $1 ORDER BY seq DESC LIMIT $2",
            customer_id,
            limit,
        )
    )
