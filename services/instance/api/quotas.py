"""``/api/quotas``: the live meters (devices, messages today with the burst bucket's level, API
requests today) against the license, the notices that hold, and ``/api/quotas/limited``: what
the limits refused, per device and span of minutes; ``/api/quotas/stream``: both as server-sent
events every few seconds, for the dashboard (one request for as long as the page is open: each
request counts against the day's API requests, so the page does not poll)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import asyncpg
import msgspec
from litestar import Controller, Request, get
from litestar.params import QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from contracts.license import LicenseClaims
from libs.db.postgres import CONNECTION_ERRORS
from libs.http.auth import bearer
from services.instance.api.access import COOKIE, INSTANCE, Instance, customer_session
from services.instance.auth import ControlPlaneUnavailable
from services.instance.devices import active_devices, count_active_devices
from services.instance.quota_notices import Meter, current_notices, percent
from services.instance.quotas import API_REQUESTS, DEVICES, MESSAGES, TokenBucket, limited_spans
from services.instance.state import InstanceState

# How often the stream sends the meters, and checks that its session still holds.
STREAM_SECONDS = 5.0
SESSION_CHECK_SECONDS = 30.0

Hours = Annotated[
    int, QueryParameter(ge=1, le=24 * 90, description="how far back, in hours (default 24)")
]


def license_meters(
    claims: LicenseClaims, instance: InstanceState, devices: int, now: datetime
) -> list[Meter]:
    """The three meters at ``now``: a day's count that has not been rolled yet is 0."""
    ingest, api = instance.ingest, instance.api_requests
    messages = ingest.accepted_today if ingest.today == now.date() else 0
    requests = api.count if api.day == now.date() else 0
    return [
        Meter(DEVICES, devices, claims.features.maxDevices, daily=False),
        Meter(MESSAGES, messages, claims.limits.mqttMessagesPerDay, daily=True),
        Meter(API_REQUESTS, requests, claims.limits.apiRequestsPerDay, daily=True),
    ]


def meters_now(instance: InstanceState, devices: int) -> list[Meter]:
    """The meters for the quota watch (none while there is no license)."""
    claims = instance.license.claims
    if claims is None:
        return []
    return license_meters(claims, instance, devices, datetime.now(UTC))


def _bucket_view(instance: InstanceState, daily: int, now: datetime) -> dict[str, Any]:
    bucket = instance.ingest.bucket
    if bucket is None:  # no reading yet since the start: full, or as saved
        bucket = TokenBucket.full(daily, now)
        saved = instance.ingest.saved_bucket
        if saved is not None:
            bucket.level, bucket.at = min(saved[0], bucket.capacity), saved[1]
    else:
        bucket = TokenBucket(bucket.capacity, bucket.refill, bucket.level, bucket.at, bucket.daily)
        bucket.reshape(daily)
    return bucket.view(now)


async def quota_view(instance: InstanceState) -> dict[str, Any]:
    """Each meter's use against its limit (and the bucket's level for messages), the notices
    that hold now, and how much the limits refused today."""
    claims = instance.licensed()
    now = datetime.now(UTC)
    async with instance.pool().acquire() as conn:
        devices = await count_active_devices(conn)
        notices = await current_notices(conn, now)
        refused = await conn.fetchval(
            "SELECT coalesce(sum(count), 0) FROM quota_limited WHERE minute >= $1",
            datetime.combine(now.date(), datetime.min.time(), UTC),
        )
    meters: dict[str, Any] = {
        m.name: {"used": m.used, "limit": m.limit, "percent": percent(m.used, m.limit)}
        for m in license_meters(claims, instance, devices, now)
    }
    meters[MESSAGES]["bucket"] = _bucket_view(instance, claims.limits.mqttMessagesPerDay, now)
    return {"day": now.date(), "meters": meters, "notices": notices, "refused_today": int(refused)}


async def limited_view(instance: InstanceState, hours: int) -> dict[str, Any]:
    """What the limits refused in the last ``hours``."""
    since = datetime.now(UTC) - timedelta(hours=hours)
    async with instance.pool().acquire() as conn:
        names = {r["device_id"]: r["name"] for r in await active_devices(conn)}
        spans = await limited_spans(conn, since, names)
    return {"since": since, "limited": spans}


async def _live(
    instance: InstanceState, still_signed_in: Callable[[], Awaitable[bool]]
) -> AsyncIterator[ServerSentEventMessage]:
    """The meters every ``STREAM_SECONDS`` (event ``quotas``), and what was refused in the last
    24 hours (event ``limited``) first and whenever today's count of refusals changes."""
    refused, checked = -1, time.monotonic()
    while True:
        try:
            view = await quota_view(instance)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError):  # away a moment: the stream goes on
            yield ServerSentEventMessage(comment="not available; trying again")
        else:
            yield ServerSentEventMessage(event="quotas", data=msgspec.json.encode(view).decode())
            if view["refused_today"] != refused:
                refused = view["refused_today"]
                limited = msgspec.json.encode(await limited_view(instance, 24)).decode()
                yield ServerSentEventMessage(event="limited", data=limited)
        await asyncio.sleep(STREAM_SECONDS)
        if time.monotonic() - checked >= SESSION_CHECK_SECONDS:
            if not await still_signed_in():
                return
            checked = time.monotonic()


class QuotasController(Controller):
    """The quotas: how much is used, what was noticed, what was refused."""

    path = "/api/quotas"
    guards = (customer_session,)
    dependencies = INSTANCE

    @get("/", tags=["instance"])
    async def quotas(self, instance: Instance) -> dict[str, Any]:
        """Each meter's use against its limit (and the bucket's level for messages), the
        notices at 80% and 100% that hold now, and how much was refused today."""
        return await quota_view(instance)

    @get("/limited", tags=["instance"])
    async def limited(self, instance: Instance, hours: Hours = 24) -> dict[str, Any]:
        """What the limits refused in the last ``hours``, newest first: per device (or none, for
        API requests and registrations) and span of consecutive minutes, with the limit."""
        return await limited_view(instance, hours)

    @get("/stream", tags=["instance"])
    async def stream(self, request: Request[Any, Any, Any], instance: Instance) -> ServerSentEvent:
        """The meters as server-sent events (``quotas`` every few seconds, ``limited`` when
        something more was refused), while the session that asked is valid."""
        instance.licensed()
        token = bearer(request) or request.cookies.get(COOKIE)

        async def still_signed_in() -> bool:
            try:
                return await instance.sessions.caller(token) == "customer"
            except ControlPlaneUnavailable:
                return True  # the control plane away a moment does not stop the meters

        return ServerSentEvent(_live(instance, still_signed_in))
