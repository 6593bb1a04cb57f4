"""The account view's invoices and latest day of usage, from billing's InvoiceRecorded and the
instances' UsageReported: a projection of their own (and a checkpoint of their own), so that a
platform upgraded to it reads the invoices and usage already on the log from the start."""

from __future__ import annotations

from contracts import InvoiceRecorded, UsageReported
from libs.db.postgres import Connection
from libs.projections.apply import Projection, Recorded

# How far along an invoice's state is: a state only gives way to one at least as far along,
# whatever order Stripe's webhooks came in (an uncollectible invoice may still be paid).
INVOICE_STATUS_RANK = {"draft": 0, "open": 1, "uncollectible": 2, "paid": 3, "void": 3}


async def when_invoice_recorded_list_it(conn: Connection, r: Recorded[InvoiceRecorded]) -> None:
    e = r.event
    await conn.execute(
        """
        INSERT INTO account_invoices AS i (customer_id, stripe_invoice_id, number, status,
                                           status_rank, amount, currency, created_at, url)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        ON CONFLICT (customer_id, stripe_invoice_id) DO UPDATE SET
            number = COALESCE(EXCLUDED.number, i.number), status = EXCLUDED.status,
            status_rank = EXCLUDED.status_rank, amount = EXCLUDED.amount,
            currency = EXCLUDED.currency, url = COALESCE(EXCLUDED.url, i.url)
        WHERE EXCLUDED.status_rank >= i.status_rank
        """,
        e.customer_id,
        e.stripe_invoice_id,
        e.number,
        e.status,
        INVOICE_STATUS_RANK.get(e.status, 1),
        e.amount,
        e.currency,
        e.created_at,
        e.hosted_invoice_url,
    )


async def when_usage_reported_show_latest_day(conn: Connection, r: Recorded[UsageReported]) -> None:
    # The same day again is a later count of it; an older day's late report changes nothing.
    e = r.event
    await conn.execute(
        """
        INSERT INTO account_usage AS u (customer_id, day, devices, messages, api_requests,
                                        reported_at)
        VALUES ($1, $2, $3, $4, $5, $6)
        ON CONFLICT (customer_id) DO UPDATE SET day = EXCLUDED.day, devices = EXCLUDED.devices,
            messages = EXCLUDED.messages, api_requests = EXCLUDED.api_requests,
            reported_at = EXCLUDED.reported_at
        WHERE EXCLUDED.day >= u.day
        """,
        e.customer_id,
        e.day,
        e.devices,
        e.mqtt_messages,
        e.api_requests,
        r.envelope.occurred_at,
    )


INVOICES_AND_USAGE = Projection(
    name="invoices_and_usage",
    tables=("account_invoices", "account_usage"),
    handlers={
        InvoiceRecorded: when_invoice_recorded_list_it,
        UsageReported: when_usage_reported_show_latest_day,
    },
)
