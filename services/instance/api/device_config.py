"""``/api/devices/{device_id}/config``: a fleet device's desired configuration, set and read,
beside what the device reported it applied."""

from __future__ import annotations

from typing import Any

from litestar import Controller, get, put
from litestar.params import FromPath, JSONBody

from services.instance.api.access import INSTANCE, Instance, customer_session, read_write
from services.instance.device_config import config_row, config_view, desired_config, set_desired

BODY_LIMIT = 16 * 1024


class DeviceConfigController(Controller):
    """The customer's fleet devices' remote configuration."""

    path = "/api/devices/{device_id:str}/config"
    guards = (customer_session,)
    dependencies = INSTANCE

    @get("/", tags=["devices"])
    async def get_config(self, device_id: FromPath[str], instance: Instance) -> dict[str, Any]:
        """The desired configuration (null and version 0 before any is set), whether it is on
        the broker, and the device's last report (``in_sync`` when it applied this version)."""
        async with instance.pool().acquire() as conn:
            row = await config_row(conn, device_id)
        return config_view(row, instance.config_publisher.unavailable_reason)

    @put("/", request_max_body_size=BODY_LIMIT, tags=["devices"], guards=[read_write])
    async def set_config(
        self, device_id: FromPath[str], data: JSONBody[Any], instance: Instance
    ) -> dict[str, Any]:
        """Replace the desired configuration (one version up) and deliver it to the device as
        a retained message; stored even when the broker cannot take it now (``published``
        false, ``unpublished_reason`` says why; it is delivered when the broker can)."""
        desired = desired_config(data)
        async with instance.pool().acquire() as conn:
            await set_desired(conn, device_id, desired)
        reason = await instance.config_publisher.publish(device_id)
        # Ingest applies the desired temperature offset to the device's readings from now on.
        instance.ingest.config_changed(device_id)
        async with instance.pool().acquire() as conn:
            row = await config_row(conn, device_id)
        return config_view(row, reason)
