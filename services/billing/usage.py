"""Usage that customers' instances report: received over HTTP, recorded as UsageReported; and
their quota notices (a meter at 80% or 100% of its limit), recorded as QuotaNoticeReported for
signup to mail the customer.

An instance posts its counts for a UTC day every few minutes and once more, ``final``, when
the day is over. It proves who it is with a token derived from ``USAGE_SECRET`` and its
customer id (the provisioner hands each instance its own), so one instance cannot report for
another. The event's id comes from the report's content, so a retried post is stored once.
"""

from __future__ import annotations

import hmac
import uuid
from datetime import date, datetime
from typing import Annotated, Any, Literal

import asyncpg
import msgspec
from msgspec import Meta

from contracts import QuotaNoticeReported, UsageReported
from contracts.credentials import instance_usage_token
from libs.db.postgres import Connection
from libs.eventlog.store import EventStore
from libs.http.auth import bearer
from libs.http.errors import Unauthorized
from libs.http.validation import decode
from libs.projections.apply import Projection, Recorded

Count = Annotated[int, Meta(ge=0, le=2**63 - 1)]  # what the bigint columns hold


class UsageReport(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What an instance reports for one UTC day."""

    day: date
    devices: Count
    mqtt_messages: Count
    api_requests: Count
    rejected_readings: Count
    storage_bytes: Count
    final: bool = False


class QuotaNotice(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What an instance reports when a meter reaches 80% or 100% of its limit."""

    meter: Literal["devices", "mqtt_messages", "api_requests"]
    level: Literal[80, 100]
    used: Count
    limit: Count
    period: Annotated[str, Meta(min_length=1, max_length=64)]
    noticed_at: Annotated[datetime, Meta(tz=True)]


def check_instance(request: Any, secret: str | None, customer_id: str) -> None:
    """401 unless the request carries this customer's instance token."""
    token = bearer(request)
    if (
        not secret
        or not token
        # Bytes: compare_digest refuses str with anything but ASCII, and a token may hold any.
        or not hmac.compare_digest(
            token.encode(), instance_usage_token(secret, customer_id).encode()
        )
    ):
        raise Unauthorized("an instance usage token is required")


def parse_report(body: bytes) -> UsageReport:
    """The report, or 400 naming the field that is wrong and why."""
    return decode(body, UsageReport, "invalid usage report")


def usage_event(customer_id: str, report: UsageReport) -> tuple[UsageReported, str]:
    """The event and its content-derived id."""
    event = UsageReported(
        customer_id=customer_id,
        day=report.day,
        devices=report.devices,
        mqtt_messages=report.mqtt_messages,
        api_requests=report.api_requests,
        rejected_readings=report.rejected_readings,
        storage_bytes=report.storage_bytes,
        final=report.final,
    )
    content = msgspec.json.encode(event).decode()
    return event, str(uuid.uuid5(uuid.NAMESPACE_URL, f"usage:{customer_id}:{content}"))


async def record_usage(store: EventStore, customer_id: str, report: UsageReport) -> UsageReported:
    """Append the report as ``UsageReported`` (once, however often it is retried)."""
    event, event_id = usage_event(customer_id, report)
    await store.publish(event, customer_id=customer_id, event_id=event_id)
    return event


def parse_notice(body: bytes) -> QuotaNotice:
    """The notice, or 400 naming the field that is wrong and why."""
    return decode(body, QuotaNotice, "invalid quota notice")


async def record_quota_notice(
    store: EventStore, customer_id: str, notice: QuotaNotice
) -> QuotaNoticeReported:
    """Append the notice as ``QuotaNoticeReported``, once per meter, period and level however
    often it is retried (its id comes from those)."""
    event = QuotaNoticeReported(
        customer_id=customer_id,
        meter=notice.meter,
        level=notice.level,
        used=notice.used,
        limit=notice.limit,
        period=notice.period,
        noticed_at=notice.noticed_at,
    )
    key = f"quota-notice:{customer_id}:{notice.meter}:{notice.period}:{notice.level}"
    await store.publish(
        event, customer_id=customer_id, event_id=str(uuid.uuid5(uuid.NAMESPACE_URL, key))
    )
    return event


async def usage_days(pool: asyncpg.Pool, customer_id: str) -> list[dict[str, Any]]:
    """The customer's usage per day, newest first (the last 90 days)."""
    rows = await pool.fetch(
        "SELECT day, devices, mqtt_messages, api_requests, rejected_readings, "
        "storage_bytes, final FROM usage_days WHERE customer_id = $1 "
        "ORDER BY day DESC LIMIT 90",
        customer_id,
    )
    return [dict(r) for r in rows]


async def when_usage_reported_record_it(conn: Connection, r: Recorded[UsageReported]) -> None:
    e = r.event
    # A day's counts only grow; a late, older report never lowers them, and final stays final.
    await conn.execute(
        """
        INSERT INTO usage_days (customer_id, day, devices, mqtt_messages, api_requests,
                                rejected_readings, storage_bytes, final, reported_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
        ON CONFLICT (customer_id, day) DO UPDATE SET
            devices = CASE WHEN usage_days.final THEN usage_days.devices ELSE EXCLUDED.devices END,
            mqtt_messages = GREATEST(usage_days.mqtt_messages, EXCLUDED.mqtt_messages),
            api_requests = GREATEST(usage_days.api_requests, EXCLUDED.api_requests),
            rejected_readings = GREATEST(usage_days.rejected_readings, EXCLUDED.rejected_readings),
            storage_bytes = CASE WHEN usage_days.final THEN usage_days.storage_bytes
                                 ELSE EXCLUDED.storage_bytes END,
            final = usage_days.final OR EXCLUDED.final,
            reported_at = GREATEST(usage_days.reported_at, EXCLUDED.reported_at)
        """,
        e.customer_id,
        e.day,
        e.devices,
        e.mqtt_messages,
        e.api_requests,
        e.rejected_readings,
        e.storage_bytes,
        e.final,
        r.envelope.occurred_at,
    )


USAGE = Projection(
    name="usage",
    tables=("usage_days",),
    handlers={UsageReported: when_usage_reported_record_it},
)
