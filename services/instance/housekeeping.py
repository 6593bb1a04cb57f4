"""The instance's housekeeping: its usage as Prometheus gauges every half minute, and, every
hour, the readings' day partitions past the license's retention dropped whole (and the fleet
registrations' audit rows and the quotas' refusals past it, with ended windows of failed
attempts, and the fleet devices whose key exchange never came within a day)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
from prometheus_client import CollectorRegistry, Gauge

from libs.db.postgres import CONNECTION_ERRORS, Turns
from services.instance.calibration import forget_old_changes
from services.instance.devices import BrokerUnavailable, Devices, count_active_devices
from services.instance.ingest import Ingest
from services.instance.license import LicenseHolder
from services.instance.quotas import forget_old_refusals
from services.instance.readings import drop_expired_partitions
from services.instance.registration import abandoned_registrations
from services.instance.registration_audit import forget_old_attempts
from services.instance.state import ApiRequestsToday
from services.instance.usage import database_size, usage_day

log = logging.getLogger(__name__)

RETENTION_EVERY = 3600.0


class UsageGauges:
    """The day's usage as gauges of the instance's /metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        """Registers the gauges."""
        self.devices = Gauge("iotistic_instance_devices", "Registered devices", registry=registry)
        self.mqtt_messages = Gauge(
            "iotistic_instance_mqtt_messages_today", "Readings accepted today", registry=registry
        )
        self.api_requests = Gauge(
            "iotistic_instance_api_requests_today", "API requests today", registry=registry
        )
        self.rejected = Gauge(
            "iotistic_instance_rejected_readings_today",
            "Readings rejected today",
            registry=registry,
        )
        self.storage = Gauge(
            "iotistic_instance_storage_bytes", "Size of the instance's database", registry=registry
        )


async def _stored_usage(
    conn: asyncpg.Connection, gauges: UsageGauges, holder: LicenseHolder, retention_due: bool
) -> bool:
    """Set the gauges read from the database and, when due, apply the retention; whether it
    was applied."""
    gauges.devices.set(await count_active_devices(conn))
    today = await usage_day(conn, datetime.now(UTC).date())
    gauges.rejected.set(today["rejected_readings"] if today else 0)
    gauges.storage.set(await database_size(conn))
    claims = holder.claims
    if claims is None or not retention_due:
        return False
    keep = datetime.now(UTC).date() - timedelta(days=claims.features.dataRetentionDays)
    dropped = await drop_expired_partitions(conn, keep)
    if dropped:
        log.info("retention: dropped %s", ", ".join(dropped))
    await forget_old_attempts(conn, claims.features.dataRetentionDays)
    await forget_old_changes(conn, datetime.combine(keep, datetime.min.time(), UTC))
    await forget_old_refusals(conn, claims.features.dataRetentionDays)
    return True


async def _forget_abandoned(conn: asyncpg.Connection, devices: Devices, ingest: Ingest) -> None:
    """Remove the fleet devices that registered a day ago or more and never completed their key
    exchange: what a leaked provisioning key registered, or a device that gave up, frees its
    place under maxDevices (a device that comes back registers again)."""
    for device_id in await abandoned_registrations(conn, datetime.now(UTC)):
        try:
            # It may have completed its key exchange since it was listed: then it stays.
            if not await devices.remove(conn, device_id, pending_only=True):
                continue
        except BrokerUnavailable as exc:
            log.warning("housekeeping: abandoned fleet devices stay for now: %s", exc)
            return
        ingest.forget_device(device_id)
        log.info("removed fleet device %s: its key exchange never came", device_id)


async def housekeeping(
    pool: Callable[[], asyncpg.Pool | Turns],
    holder: LicenseHolder,
    ingest: Ingest,
    gauges: UsageGauges,
    api_requests: ApiRequestsToday,
    devices: Devices | None = None,
) -> None:
    """Every half minute: usage gauges; every hour: drop partitions past retention."""
    # None until the retention first ran: the loop's clock counts from the machine's boot,
    # so "an hour since 0" is not yet true on a machine up for less than an hour.
    last_retention: float | None = None
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(30 if last_retention is not None else 2)
        try:
            async with pool().acquire() as conn:
                due = last_retention is None or loop.time() - last_retention > RETENTION_EVERY
                if await _stored_usage(conn, gauges, holder, due):
                    last_retention = loop.time()
                    if devices is not None:
                        await _forget_abandoned(conn, devices, ingest)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            log.warning("housekeeping: %s", type(exc).__name__)
        gauges.mqtt_messages.set(ingest.accepted_today)
        gauges.api_requests.set(api_requests.count)
