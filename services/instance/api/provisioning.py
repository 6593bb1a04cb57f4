"""Fleet provisioning: the customer's provisioning keys and their audit trail
(``/api/provisioning-keys``), and the routes devices register themselves with
(``/api/v1/device/...``, the original agent's paths and shapes, authenticated by the keys and
no session)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from litestar import Controller, Request, delete, get, post
from litestar.params import FromPath, JSONBody, QueryParameter

from libs.http.app import client_address
from libs.http.auth import bearer
from libs.http.errors import Forbidden
from services.instance import fleet
from services.instance.api.access import INSTANCE, Instance, customer_session, read_write
from services.instance.provisioning_keys import (
    audit_entries,
    audit_limit,
    create_key,
    list_keys,
    new_key_request,
    revoke_key,
)
from services.instance.quotas import DEVICE_LIMIT
from services.instance.registration import FleetRegistered, exchange_api_key
from services.instance.registration_audit import Attempt, LicenseFull

BODY_LIMIT = 4096
# Checked by ``audit_limit``, so a bad one is answered naming the field like every other.
AuditLimit = Annotated[
    str | None, QueryParameter(description="entries to show, 1..1000 (default 100)")
]


class ProvisioningKeysController(Controller):
    """The keys the customer's devices register themselves with."""

    path = "/api/provisioning-keys"
    guards = (customer_session,)
    dependencies = INSTANCE

    @post(
        "/",
        status_code=201,
        request_max_body_size=BODY_LIMIT,
        tags=["provisioning"],
        guards=[read_write],
    )
    async def create_provisioning_key(
        self, data: JSONBody[Any], instance: Instance
    ) -> dict[str, Any]:
        """A new key; the key itself is in this answer only (kept as its sha256)."""
        now = datetime.now(UTC)
        new = new_key_request(data, now)
        async with instance.pool().acquire() as conn:
            return await create_key(conn, new, now)

    @get("/", tags=["provisioning"])
    async def list_provisioning_keys(self, instance: Instance) -> dict[str, Any]:
        """Every key, newest first, with its state, uses and active devices."""
        async with instance.pool().acquire() as conn:
            return {"keys": await list_keys(conn, datetime.now(UTC))}

    @get("/audit", tags=["provisioning"])
    async def registration_audit(
        self, instance: Instance, limit: AuditLimit = None
    ) -> dict[str, Any]:
        """The newest registrations and key exchanges (``limit``, 1..1000, default 100),
        accepted or refused, with the caller's address and the key's id."""
        count = audit_limit(limit)
        async with instance.pool().acquire() as conn:
            return {"entries": await audit_entries(conn, count)}

    @delete("/{key_id:str}", status_code=204, tags=["provisioning"], guards=[read_write])
    async def revoke_provisioning_key(self, key_id: FromPath[str], instance: Instance) -> None:
        """The key registers no more devices; those registered with it stay."""
        async with instance.pool().acquire() as conn:
            await revoke_key(conn, key_id, datetime.now(UTC))


def registered_answer(device: FleetRegistered, instance: Instance) -> dict[str, Any]:
    """The original agent's answer to a registration: the device and how it connects (its
    password, once)."""
    own = f"{fleet.device_root(device.uuid)}/#"
    return {
        "id": device.device_id,
        "uuid": device.uuid,
        "deviceName": device.device_name,
        "deviceType": device.device_type,
        "mqtt": {
            "username": device.username,
            "password": device.password,
            "clientId": device.uuid,
            "broker": instance.brokers[0],
            "brokers": instance.brokers,
            "topics": {"publish": own, "subscribe": own},
        },
    }


class DeviceRegistrationController(Controller):
    """Devices registering themselves (no session: the provisioning key or the device's own
    API key is the credential)."""

    path = "/api/v1/device"
    dependencies = INSTANCE

    @post("/register", status_code=200, request_max_body_size=BODY_LIMIT, tags=["provisioning"])
    async def register_fleet_device(
        self, request: Request[Any, Any, Any], instance: Instance
    ) -> dict[str, Any]:
        """Register a device with a provisioning key (``Authorization: Bearer``): body
        ``{uuid, deviceName, deviceType, deviceApiKey}``; its broker password is in this
        answer only."""
        attempt = Attempt("register", client_address(request, instance.settings.trusted_proxy_hops))
        key, body = bearer(request), await request.body()

        async def register(conn: Any) -> FleetRegistered:
            if instance.read_only():
                raise Forbidden("read-only: the license has expired; no device may register")
            max_devices = instance.licensed().features.maxDevices
            return await instance.fleet.register(conn, attempt, key, body, max_devices)

        try:
            device = await instance.fleet.attempt(instance.pool(), attempt, register)
        except LicenseFull:
            max_devices = instance.licensed().features.maxDevices
            instance.ingest.refused(
                DEVICE_LIMIT, datetime.now(UTC), max_devices, "device registrations"
            )
            raise
        # Ingest takes the device's messages from now on.
        instance.ingest.know_fleet_device(device.device_id, device.uuid)
        return registered_answer(device, instance)

    @post(
        "/{uuid:str}/key-exchange",
        status_code=200,
        request_max_body_size=BODY_LIMIT,
        tags=["provisioning"],
    )
    async def exchange_device_key(
        self, uuid: FromPath[str], request: Request[Any, Any, Any], instance: Instance
    ) -> dict[str, Any]:
        """Complete the device's provisioning with its ``deviceApiKey`` (``Authorization:
        Bearer``, or the body's ``deviceApiKey``); repeating it answers the same."""
        attempt = Attempt(
            "key-exchange", client_address(request, instance.settings.trusted_proxy_hops)
        )
        attempt.uuid = uuid
        token, body = bearer(request), await request.body()

        async def exchange(conn: Any) -> dict[str, Any]:
            return await instance.fleet.exchange(conn, attempt, exchange_api_key(token, body))

        return await instance.fleet.attempt(instance.pool(), attempt, exchange)


# The instance's app serves both (``app.create_instance_app``).
PROVISIONING_ROUTES = [ProvisioningKeysController, DeviceRegistrationController]
