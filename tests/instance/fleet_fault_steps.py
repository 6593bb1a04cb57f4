"""A real instance app on its own (Postgres, Mosquitto, the license's JWKS served here) for the
fault tests of fleet provisioning: the tests break the broker or the database under it and
look at what is kept."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import msgspec
from litestar import Litestar, get

from libs.servers.mosquitto import EmbeddedMosquitto
from services.instance.app import create_instance_app
from services.instance.provisioning_keys import key_hash
from services.instance.settings import InstanceSettings
from services.instance.state import STATE_KEY, InstanceState
from support import create_database, eventually, license_keys_dir, serving, signed_license_issued

MONITORING = {"Authorization": "Bearer " + "m" * 40}
KEY = "iotpk_" + "k" * 43


@dataclass
class Running:
    """The instance, its state, its database (a connection of the test's own) and settings."""

    http: httpx.AsyncClient
    url: str
    state: InstanceState
    db: asyncpg.Connection
    settings: InstanceSettings


@contextlib.asynccontextmanager
async def running_instance(
    postgres_server_url: str,
    broker: EmbeddedMosquitto,
    *,
    mqtt_port: int | None = None,
    plan: str = "professional",
    database_port: int | None = None,
    **overrides: Any,
) -> AsyncIterator[Running]:
    """An instance (of ``plan``) with the provisioning key ``KEY``, ready."""
    from services.licensing.keys import load_keyring

    customer_id = str(uuid.uuid4())
    keyring = load_keyring(Path(license_keys_dir()))

    @get("/jwks")
    async def jwks() -> dict[str, Any]:
        return keyring.jwks()

    database = await create_database(postgres_server_url)
    # The instance may reach the database through a relay of the test's (``database_port``);
    # the test's own connection goes to it directly.
    reached = urlsplit(database)
    if database_port is not None:
        reached = reached._replace(netloc=reached.netloc.rsplit(":", 1)[0] + f":{database_port}")
    async with serving(Litestar([jwks])) as control:
        settings = msgspec.convert(
            {
                "instance_customer_id": customer_id,
                "database_url": urlunsplit(reached),
                "license_jwt": signed_license_issued(customer_id, plan=plan).jwt,
                "license_jwks_url": f"{control.base_url}/jwks",
                "control_plane_url": str(control.base_url),
                "mqtt_host": "127.0.0.1",
                "mqtt_port": mqtt_port or broker.port,
                "mqtt_username": f"instance-{uuid.uuid4().hex[:8]}",
                "mqtt_password": "p" * 32,
                "mqtt_admin_username": broker.admin_username,
                "mqtt_admin_password": broker.admin_password,
                "monitoring_token": "m" * 40,
                **overrides,
            },
            InstanceSettings,
        )
        app = create_instance_app(settings)
        async with serving(app) as instance:
            await eventually(
                lambda: instance.get("/health/ready", headers=MONITORING),
                lambda r: r.status_code == 200,
                what="ready",
            )
            conn = await asyncpg.connect(database, server_settings={"search_path": "instance"})
            try:
                await conn.execute(
                    "INSERT INTO provisioning_keys (key_id, name, key_hash, created_at) "
                    "VALUES ('pk_test', 'test', $1, now())",
                    key_hash(KEY),
                )
                yield Running(
                    instance, str(instance.base_url), app.state[STATE_KEY], conn, settings
                )
            finally:
                await conn.close()
