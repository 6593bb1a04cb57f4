"""``/api/devices/{device_id}/calibration``: a device's BME688 calibration (from BSEC's
``iaq_accuracy``) with its history of runs and drops, and how long calibration usually takes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from litestar import Controller, get
from litestar.params import FromPath

from services.instance.api.access import INSTANCE, Instance, customer_session
from services.instance.calibration import calibration_view
from services.instance.devices import known_device


class CalibrationController(Controller):
    """The customer's devices' calibration."""

    path = "/api/devices/{device_id:str}/calibration"
    guards = (customer_session,)
    dependencies = INSTANCE

    @get("/", tags=["devices"])
    async def get_calibration(self, device_id: FromPath[str], instance: Instance) -> dict[str, Any]:
        """The state (``unknown``: no BSEC fields yet, ``stabilising``: accuracy 0,
        ``calibrating``: 1-2, ``calibrated``: 3), since when, when the current run started
        and when the sensor was first seen; the runs (each with the time it took to reach
        accuracy 3, and the drop to 0 that ended it) and the changes, newest first; what
        calibration usually takes (days for a new sensor, minutes after a power cycle of one
        calibrated before), and the temperature offset applied to the newest reading."""
        async with (
            instance.pool().acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            await known_device(conn, device_id, include_deleted=True)
            return await calibration_view(conn, device_id, datetime.now(UTC))
