"""Real tenants for the security tests: the control plane with the local backend, customers
who sign up and get an instance process of their own, and their devices on the real broker.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import paho.mqtt.client as paho

from libs.config import ServiceSettings
from libs.runtime.platform import Platform
from libs.servers.mosquitto import EmbeddedMosquitto
from services.targets import CONTROL_PLANE, build_app
from support import eventually, local_backend_settings, serving

PASSWORD = "a long passphrase"


@contextlib.asynccontextmanager
async def control_plane(
    settings: ServiceSettings, broker: EmbeddedMosquitto, port: int, folder: Path, **extra: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """Every control-plane service on ``port``, deploying instances here on ``broker``."""
    platform = Platform.from_settings(
        settings,
        list(CONTROL_PLANE.values()),
        **local_backend_settings(broker, port, folder, **extra),
    )
    async with serving(build_app(platform, "all"), port) as http:
        await platform.wait_started()
        yield http


class Tenant:
    """A signed-up customer, their session, and a client for their instance's API."""

    def __init__(self, customer_id: str, email: str, token: str, url: str) -> None:
        self.id = customer_id
        self.email = email
        self.url = url
        self.auth = {"Authorization": f"Bearer {token}"}
        self.api = httpx.AsyncClient(base_url=url, timeout=10, headers=self.auth)


async def sign_up(client: httpx.AsyncClient, email: str) -> Tenant:
    """Sign up, sign in, and wait for the customer's instance."""
    signed = await client.post(
        "/api/customers/signup",
        json={"email": email, "password": PASSWORD, "company_name": "Air Co"},
    )
    assert signed.status_code == 201, signed.text
    login = await client.post("/api/customers/login", json={"email": email, "password": PASSWORD})
    token = login.json()["token"]
    me = await eventually(
        lambda: client.get("/api/customers/me", headers={"Authorization": f"Bearer {token}"}),
        lambda r: r.json()["deployment"]["status"] == "ready",
        timeout=60,
        what="the customer's instance",
    )
    customer_id = signed.json()["customer"]["customer_id"]
    return Tenant(customer_id, email, token, me.json()["deployment"]["instance_url"])


async def register(tenant: Tenant, name: str) -> dict[str, Any]:
    """A new device of the tenant, with its broker credentials."""
    answer = await tenant.api.post("/api/devices", json={"name": name})
    assert answer.status_code == 201, answer.text
    device: dict[str, Any] = answer.json()
    return device


def device_client(
    broker: EmbeddedMosquitto,
    device: dict[str, Any],
    client_id: str | None = None,
    clean_start: bool = True,
) -> aiomqtt.Client:
    """An MQTT 5 client with the device's credentials, under ``client_id`` (by default the
    one its registration gave it)."""
    mqtt = device["mqtt"]
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=mqtt["username"],
        password=mqtt["password"],
        identifier=client_id or mqtt.get("client_id") or device["device_id"],
        protocol=paho.MQTTv5,
        clean_start=clean_start,
        timeout=5,
    )


def reading(**overrides: Any) -> bytes:
    """A valid BME688 reading as a device publishes it."""
    body = {
        "ts": datetime.now(UTC).isoformat(),
        "temperature": 21.5,
        "humidity": 45.2,
        "pressure": 1013.2,
        "gas_resistance": 125000.0,
        "iaq": 42.0,
    }
    body.update(overrides)
    return json.dumps(body).encode()


async def stored_times(tenant: Tenant, device_id: str, since: datetime) -> set[str]:
    """The timestamps of the device's readings stored since ``since``."""
    answer = await tenant.api.get(
        f"/api/devices/{device_id}/readings.csv", params={"from": since.isoformat()}
    )
    assert answer.status_code == 200, answer.text
    return {line.split(",")[0] for line in answer.text.splitlines()[1:]}
