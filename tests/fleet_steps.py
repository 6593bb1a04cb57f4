"""What a customer and their fleet devices do to provision themselves, through the instance's
real API, for the tests of fleet provisioning and of what other parts make of fleet devices:
make a provisioning key, register a device with it (as the original agent does), complete its
key exchange, and connect to the broker with its credentials."""

from __future__ import annotations

import secrets
import uuid as uuids
from typing import Any

import aiomqtt
import httpx

from support import eventually


async def upgrade_to_professional(store: Any, customer: Any) -> None:
    """The customer's subscription becomes the professional plan (maxDevices 50), as billing
    says after Stripe's checkout; returns once the instance holds the new license."""
    from contracts import SubscriptionActivated

    await store.publish(
        SubscriptionActivated(
            customer_id=customer.id,
            plan="professional",
            status="active",
            stripe_customer_id=f"cus_{customer.id[:12]}",
            stripe_subscription_id=f"sub_{customer.id[:12]}",
        ),
        customer_id=customer.id,
    )
    await eventually(
        lambda: customer.api.get("/api/license"),
        lambda r: r.json().get("plan") == "professional",
        timeout=60,
        what="the professional license on the instance",
    )


async def create_key(customer: Any, **fields: Any) -> dict[str, Any]:
    """A new provisioning key of ``customer`` (a ``test_instance.Customer``); its answer,
    with the key itself under ``key``."""
    answer = await customer.api.post("/api/provisioning-keys", json={"name": "fleet", **fields})
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


def new_uuid() -> str:
    """A device uuid as the original agent makes one."""
    return str(uuids.uuid4())


def new_api_key() -> str:
    """A deviceApiKey as the original agent makes one."""
    return secrets.token_hex(32)


async def post_registration(
    instance_url: str, key: str | None, body: Any, *, headers: dict[str, str] | None = None
) -> httpx.Response:
    """``POST /api/v1/device/register`` as sent, whatever the answer."""
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    async with httpx.AsyncClient(base_url=instance_url, timeout=30) as http:
        return await http.post("/api/v1/device/register", json=body, headers=sent)


def registration_body(uuid: str, api_key: str, name: str | None = None) -> dict[str, Any]:
    """The body the original agent registers with."""
    return {
        "uuid": uuid,
        "deviceName": name or f"sensor {uuid[:8]}",
        "deviceType": "bme688",
        "deviceApiKey": api_key,
    }


async def register_fleet_device(
    instance_url: str, key: str, uuid: str | None = None, api_key: str | None = None
) -> dict[str, Any]:
    """Register a device with the provisioning ``key``; the answer (its broker credentials
    under ``mqtt``) plus the ``deviceApiKey`` it registered with."""
    uuid = uuid or new_uuid()
    api_key = api_key or new_api_key()
    answer = await post_registration(instance_url, key, registration_body(uuid, api_key))
    assert answer.status_code == 200, answer.text
    return {**answer.json(), "deviceApiKey": api_key}


async def exchange_key(instance_url: str, uuid: str, api_key: str) -> httpx.Response:
    """``POST /api/v1/device/{uuid}/key-exchange`` with the device's API key, whatever the
    answer."""
    async with httpx.AsyncClient(base_url=instance_url, timeout=30) as http:
        return await http.post(
            f"/api/v1/device/{uuid}/key-exchange",
            headers={"Authorization": f"Bearer {api_key}"},
        )


async def provision_fleet_device(instance_url: str, key: str) -> dict[str, Any]:
    """A device registered and with its key exchange done (``provisioned``)."""
    device = await register_fleet_device(instance_url, key)
    exchanged = await exchange_key(instance_url, device["uuid"], device["deviceApiKey"])
    assert exchanged.status_code == 200, exchanged.text
    return device


def fleet_mqtt_client(broker: Any, registered: dict[str, Any], **options: Any) -> aiomqtt.Client:
    """A broker client with a registered fleet device's credentials and client id (``broker``
    is the test's ``EmbeddedMosquitto``)."""
    mqtt = registered["mqtt"]
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=mqtt["username"],
        password=mqtt["password"],
        identifier=mqtt["clientId"],
        **options,
    )
