"""Each instance's client on the shared Mosquitto: a role whose ACLs cover the customer's
topics only, and a client of it bound to the instance's client id (dynamic security)."""

from __future__ import annotations

from libs.mqtt.dynsec import FLEET_ROOT, DynSec, DynSecError, owner_text, subtree_acls
from services.provisioner.backends.base import BackendError
from services.provisioner.settings import ProvisionerSettings


def topic_root(customer_id: str) -> str:
    """Every MQTT topic of the customer is under ``<customer_id>/`` (devices publish to
    ``<customer_id>/devices/<device_id>/readings`` and ``.../status``)."""
    return customer_id


def _dynsec(settings: ProvisionerSettings) -> DynSec | None:
    s = settings
    if not s.mqtt_admin_username or not s.mqtt_admin_password:
        return None
    return DynSec(s.mqtt_host, s.mqtt_port, s.mqtt_admin_username, s.mqtt_admin_password)


async def ensure_broker(
    settings: ProvisionerSettings, customer_id: str, name: str, password: str, client_id: str
) -> str:
    """Make (or converge) the role and client ``name``; "ready", or "not configured" when the
    broker's admin is not set."""
    dynsec = _dynsec(settings)
    if dynsec is None:
        return "not configured"
    acls = subtree_acls(topic_root(customer_id))
    try:
        async with dynsec:
            await dynsec.ensure_role(name, acls)
            await dynsec.ensure_client(
                name, password, [name], textname=customer_id, clientid=client_id
            )
    except (DynSecError, OSError) as exc:
        raise BackendError(f"broker credentials failed: {exc}") from None
    return "ready"


async def remove_broker(settings: ProvisionerSettings, customer_id: str, name: str) -> None:
    """Delete what the instance ``name`` has on the broker (nothing when the broker's admin is
    not set): its client and role, its config publisher (``<name>-config``), its fleet role
    (``<name>-fleet``), and the clients and roles of the devices that registered themselves
    with the customer's provisioning keys (their text name says whose they are), which frees
    their uuids for another account."""
    dynsec = _dynsec(settings)
    if dynsec is None:
        return
    try:
        async with dynsec:
            for device in await dynsec.clients_named(owner_text(customer_id)):
                # What the uuid holds retained (its desired configuration, what the device
                # left) is not for the next account that registers it. A fleet device's
                # client is ``iot-<uuid>``, bound to the uuid.
                held = (await dynsec.get_client(device)) or {}
                uuid = held.get("clientid") or device.removeprefix("iot-")
                if uuid != device:  # a uuid is known
                    await dynsec.clear_retained(device, uuid, f"{FLEET_ROOT}/{uuid}")
                await dynsec.delete_client(device)
                await dynsec.delete_role(device)
            await dynsec.delete_client(f"{name}-config")
            await dynsec.delete_client(name)
            await dynsec.delete_role(f"{name}-fleet")
            await dynsec.delete_role(name)
    except (DynSecError, OSError) as exc:
        raise BackendError(f"removing broker credentials failed: {exc}") from None
