"""``/api/devices``: registering a device (with its broker credentials), listing (with each
device's calibration in short), reading, renaming and deleting devices."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from litestar import Controller, delete, get, patch, post
from litestar.params import FromPath, JSONBody

from libs.http.errors import Forbidden, NotFound, UpstreamError
from libs.http.input_checks import control_character_reason
from libs.http.validation import FieldErrors, json_object
from services.instance.api.access import INSTANCE, Instance, customer_session, read_write
from services.instance.calibration import states as calibration_states
from services.instance.calibration import summary
from services.instance.devices import (
    BrokerUnavailable,
    DeviceLimitReached,
    Registered,
    active_devices,
    device_view,
    known_device,
    rename_device,
)
from services.instance.quotas import DEVICE_LIMIT
from services.instance.readings import latest

BODY_LIMIT = 4096
NAME_LIMIT = 100


def device_name(data: Any) -> str:
    """The ``name`` of a registration body, or a 400 naming every bad field."""
    body = json_object(data)
    errors = FieldErrors()
    errors.unknown(body, ("name",))
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        errors.add("name", "is required")
    elif len(name) > NAME_LIMIT:
        errors.add("name", f"must be at most {NAME_LIMIT} characters")
    elif reason := control_character_reason(name):
        errors.add("name", reason)
    errors.raise_if_any()
    return str(name).strip()


def registration(device: Registered, instance: Instance) -> dict[str, Any]:
    """The answer to a registration: the device and how it connects (its password, once)."""
    host, port = instance.broker_address
    return {
        "device_id": device.device_id,
        "name": device.name,
        "mqtt": {
            "host": host,
            "port": port,
            "urls": instance.brokers,
            "username": device.mqtt_username,
            "password": device.mqtt_password,
            "client_id": device.mqtt_client_id,
            "topics": device.topics,
        },
        "note": "the password is shown only once; store it on the device",
    }


class DevicesController(Controller):
    """The customer's devices."""

    path = "/api/devices"
    guards = (customer_session,)
    dependencies = INSTANCE

    @post(
        "/",
        status_code=201,
        request_max_body_size=BODY_LIMIT,
        tags=["devices"],
        guards=[read_write],
    )
    async def register_device(
        self, data: JSONBody[dict[str, Any]], instance: Instance
    ) -> dict[str, Any]:
        """A new device and its broker credentials; the password is shown only here."""
        name = device_name(data)
        max_devices = instance.licensed().features.maxDevices
        async with instance.pool().acquire() as conn:
            try:
                device = await instance.devices.register(conn, name, max_devices)
            except DeviceLimitReached as exc:
                instance.ingest.refused(
                    DEVICE_LIMIT, datetime.now(UTC), max_devices, "device registrations"
                )
                raise Forbidden(str(exc)) from None
            except BrokerUnavailable as exc:
                raise UpstreamError(str(exc)) from None
        instance.ingest.know_device(device.device_id)
        return registration(device, instance)

    @get("/", tags=["devices"])
    async def list_devices(self, instance: Instance) -> dict[str, Any]:
        """The customer's devices with their latest values and online state."""
        # One snapshot for both: a batch committed between them would show a reading with a
        # device not seen yet.
        async with (
            instance.pool().acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            rows = await active_devices(conn)
            ids = [r["device_id"] for r in rows]
            newest = await latest(conn, ids)
            calibrated = await calibration_states(conn, ids)
        now = datetime.now(UTC)
        return {
            "devices": [
                device_view(r, newest.get(r["device_id"]), now)
                | {"calibration": summary(calibrated.get(r["device_id"]), now)}
                for r in rows
            ]
        }

    @get("/{device_id:str}", tags=["devices"])
    async def get_device(self, device_id: FromPath[str], instance: Instance) -> dict[str, Any]:
        """One device."""
        async with (
            instance.pool().acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            row = await known_device(conn, device_id)
            newest = await latest(conn, [device_id])
            calibrated = await calibration_states(conn, [device_id])
        now = datetime.now(UTC)
        return device_view(row, newest.get(device_id), now) | {
            "calibration": summary(calibrated.get(device_id), now)
        }

    @patch(
        "/{device_id:str}",
        request_max_body_size=BODY_LIMIT,
        tags=["devices"],
        guards=[read_write],
    )
    async def rename(
        self, device_id: FromPath[str], data: JSONBody[Any], instance: Instance
    ) -> dict[str, Any]:
        """A new ``name`` for the device (its credentials and readings stay)."""
        name = device_name(data)
        async with instance.pool().acquire() as conn:
            if not await rename_device(conn, device_id, name):
                raise NotFound(f"no device {device_id}")
            row = await known_device(conn, device_id)
            newest = await latest(conn, [device_id])
        return device_view(row, newest.get(device_id), datetime.now(UTC))

    @delete("/{device_id:str}", status_code=204, tags=["devices"], guards=[read_write])
    async def delete_device(self, device_id: FromPath[str], instance: Instance) -> None:
        """Revoke the device's credentials at once; its readings stay until retention."""
        async with instance.pool().acquire() as conn:
            try:
                removed = await instance.devices.remove(conn, device_id)
            except BrokerUnavailable as exc:
                raise UpstreamError(str(exc)) from None
        if not removed:
            raise NotFound(f"no device {device_id}")
        instance.ingest.forget_device(device_id)
