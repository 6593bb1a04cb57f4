"""``/api/license`` and ``/api/usage``: the license the instance runs under, and today's usage
against its limits."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from litestar import Controller, get

from services.instance.api.access import INSTANCE, Instance, customer_session
from services.instance.dead_letters import count_dead_letters
from services.instance.devices import count_active_devices
from services.instance.usage import usage_day


class LicenseController(Controller):
    """The license and the usage it allows."""

    path = "/api"
    guards = (customer_session,)
    dependencies = INSTANCE

    @get("/license", tags=["instance"])
    async def license_view(self, instance: Instance) -> dict[str, Any]:
        """The license this instance runs under and what it allows."""
        holder = instance.license
        claims = holder.claims
        if claims is None:
            return {"status": None, "error": holder.error}
        status = holder.status(datetime.now(UTC))
        return {
            "customer_id": claims.customerId,
            "license_id": claims.licenseId,
            "license_type": claims.licenseType,
            "plan": claims.plan,
            "expires_at": claims.expiresAt,
            "grace_until": claims.graceUntil,
            "status": status,
            "mode": "read-only" if status == "expired" else "read-write",
            "features": claims.features,
            "limits": claims.limits,
            "error": holder.error,
        }

    @get("/usage", tags=["instance"])
    async def usage(self, instance: Instance) -> dict[str, Any]:
        """Today's usage against the license's limits."""
        claims = instance.licensed()
        async with instance.pool().acquire() as conn:
            today = await usage_day(conn, datetime.now(UTC).date())
            count = await count_active_devices(conn)
            dead = await count_dead_letters(conn)
        return {
            "day": datetime.now(UTC).date(),
            "devices": {"used": count, "limit": claims.features.maxDevices},
            "mqtt_messages": {
                "used": instance.ingest.accepted_today,
                "limit": claims.limits.mqttMessagesPerDay,
            },
            "api_requests": {
                "used": instance.api_requests.count,
                "limit": claims.limits.apiRequestsPerDay,
            },
            "rejected_readings": today["rejected_readings"] if today else 0,
            "over_quota_readings": today["over_quota_readings"] if today else 0,
            "dead_letters": dead,
            "mode": "read-only" if instance.read_only() else "read-write",
        }
