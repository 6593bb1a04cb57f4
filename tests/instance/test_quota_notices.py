"""Quota notices end to end, everything real (control plane, the provisioner's local backend,
the instance process, Postgres, NATS, Mosquitto): a meter at 80% and at 100% is shown by
``GET /api/quotas``, appended for the integrations, reported by the instance to billing
(``QuotaNoticeReported``) and mailed by signup to the account's address (signup's mail outbox,
written to the log as the tests' mail sink), each once; a limit that bites is in
``GET /api/quotas/limited``. Billing takes notices only from the customer's own instance.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from test_instance import (  # noqa: F401 - client is a fixture
    Customer,
    client,
    customer,
    instance_database,
    register,
)

from contracts.credentials import instance_usage_token
from support import eventually

pytestmark = pytest.mark.slow

EMAIL = "quinn@example.com"


@pytest.fixture(scope="module")
async def quinn(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, EMAIL)
    yield found
    await found.api.aclose()


async def quota_mails(database_url: str, email: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(
            await conn.fetch(
                "SELECT subject, body, sent_at FROM signup.mail_outbox "
                "WHERE recipient = $1 AND subject LIKE 'Iotistic: your instance%' ORDER BY id",
                email,
            )
        )
    finally:
        await conn.close()


def notice_of(answer: httpx.Response, meter: str) -> dict[str, Any] | None:
    return next((n for n in answer.json()["notices"] if n["meter"] == meter), None)


async def test_devices_at_80_and_100_percent_are_shown_mailed_and_told_to_integrations(
    quinn, database_url, postgres_server_url
) -> None:
    first = (await quinn.api.get("/api/quotas")).json()
    meters = first["meters"]
    assert meters["devices"] == {"used": 0, "limit": 10, "percent": 0.0}
    assert meters["mqtt_messages"]["limit"] == 100_000
    assert meters["mqtt_messages"]["bucket"] == {
        "level": 8333,
        "capacity": 8333,
        "refill_per_minute": 69.44,
    }
    assert meters["api_requests"]["used"] >= 1 and meters["api_requests"]["limit"] == 10_000
    assert first["notices"] == []
    for index in range(8):
        await register(quinn, f"room {index}")
    shown = await eventually(
        lambda: quinn.api.get("/api/quotas"),
        lambda r: notice_of(r, "devices") is not None,
        timeout=30,
        what="the devices' 80% notice",
    )
    assert notice_of(shown, "devices")["level"] == 80  # type: ignore[index]
    assert "8 of 10 devices registered" in notice_of(shown, "devices")["message"]  # type: ignore[index]
    mails = await eventually(
        lambda: quota_mails(database_url, EMAIL),
        lambda m: len(m) == 1 and m[0]["sent_at"] is not None,
        timeout=30,
        what="the 80% notice mailed",
    )
    assert "at 80% of its limit (devices)" in mails[0]["subject"]
    assert "8 of 10 devices registered" in mails[0]["body"]
    for index in range(2):
        await register(quinn, f"hall {index}")
    refused = await quinn.api.post("/api/devices", json={"name": "one too many"})
    assert refused.status_code == 403
    await eventually(
        lambda: quinn.api.get("/api/quotas"),
        lambda r: (notice_of(r, "devices") or {}).get("level") == 100,
        timeout=30,
        what="the devices' 100% notice",
    )
    limited = await eventually(
        lambda: quinn.api.get("/api/quotas/limited"),
        lambda r: bool(r.json()["limited"]),
        timeout=30,
        what="the refused registration listed",
    )
    span = limited.json()["limited"][0]
    assert (span["meter"], span["limit"], span["count"], span["device_id"]) == (
        "maxDevices",
        10,
        1,
        None,
    )
    assert re.fullmatch(
        r"1 device registration refused \d\d:\d\d-\d\d:\d\d UTC, the license allows 10 devices",
        span["message"],
    ), span["message"]
    mails = await eventually(
        lambda: quota_mails(database_url, EMAIL),
        lambda m: len(m) == 2 and all(one["sent_at"] for one in m),
        timeout=30,
        what="the 100% notice mailed",
    )
    assert "has reached its limit (devices)" in mails[1]["subject"]
    async with instance_database(postgres_server_url, quinn) as conn:
        kinds = await conn.fetch(
            "SELECT kind, body->>'level' AS level FROM integration_events ORDER BY id"
        )
        unreported = await conn.fetchval(
            "SELECT count(*) FROM quota_notices WHERE reported_at IS NULL"
        )
    # (the refusal and the 100% notice are written by different tasks, in either order)
    assert sorted((k["kind"], k["level"] or "") for k in kinds) == [
        ("quota.limited", ""),
        ("quota.notice", "100"),
        ("quota.notice", "80"),
    ]
    assert unreported == 0
    bad = await quinn.api.get("/api/quotas/limited", params={"hours": 0})
    assert bad.status_code == 400 and "hours" in bad.text
    # The dashboard's stream: the meters, and what was refused, in one request.
    events: dict[str, Any] = {}
    async with asyncio.timeout(30), quinn.api.stream("GET", "/api/quotas/stream") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kind = None
        async for line in stream.aiter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: ") and kind:
                events[kind] = json.loads(line.removeprefix("data: "))
            if {"quotas", "limited"} <= events.keys():
                break
    assert events["quotas"]["meters"]["devices"]["used"] == 10
    assert events["limited"]["limited"][0]["meter"] == "maxDevices"


async def test_billing_takes_notices_only_from_the_instance_and_each_once(
    client,  # noqa: F811
    quinn,
    database_url,
) -> None:
    path = f"/api/instances/{quinn.id}/quota-notices"
    period = datetime.now(UTC).date().isoformat()
    notice = {
        "meter": "api_requests",
        "level": 80,
        "used": 8000,
        "limit": 10_000,
        "period": period,
        "noticed_at": datetime.now(UTC).isoformat(),
    }
    assert (await client.post(path, json=notice)).status_code == 401
    forged = {"Authorization": f"Bearer {instance_usage_token('u' * 40, str(uuid.uuid4()))}"}
    assert (await client.post(path, json=notice, headers=forged)).status_code == 401
    own = {"Authorization": f"Bearer {instance_usage_token('u' * 40, quinn.id)}"}
    for field, value in (("level", 50), ("meter", "storage"), ("period", "x" * 65)):
        bad = await client.post(path, json={**notice, field: value}, headers=own)
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["fields"][0]["field"] == field
    huge = await client.post(path, content=b"{" + b" " * 100_000 + b"}", headers=own)
    assert huge.status_code in (400, 413)
    before = len(await quota_mails(database_url, EMAIL))
    # Sent again (its answer was lost): recorded and mailed once.
    for _ in range(2):
        answer = await client.post(path, json=notice, headers=own)
        assert answer.status_code == 202, answer.text
    mails = await eventually(
        lambda: quota_mails(database_url, EMAIL),
        lambda m: len(m) == before + 1 and m[-1]["sent_at"] is not None,
        timeout=30,
        what="the API notice mailed",
    )
    assert "at 80% of its limit (api requests)" in mails[-1]["subject"]
    assert "8,000 of 10,000 API requests of today" in mails[-1]["body"]
    # Nothing more comes of the retry.
    again = await quota_mails(database_url, EMAIL)
    assert len(again) == before + 1
