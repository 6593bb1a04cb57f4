"""An instance whose ingest is off the broker is not ready, and is again once it is back.

Issue 12's chaos run cut an instance's broker connection: its devices' readings waited at the
broker for seconds while /health/ready said 200. Here a real instance app subscribes to a
real Mosquitto through a TCP relay that the test takes down and brings back.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar import Litestar, get
from tcp_relay import TcpRelay

from libs.servers.mosquitto import EmbeddedMosquitto
from services.instance.app import create_instance_app
from services.instance.settings import InstanceSettings
from support import create_database, eventually, license_keys_dir, serving, signed_license_issued

pytestmark = pytest.mark.slow

MONITORING = {"Authorization": "Bearer " + "m" * 40}


async def test_an_instance_off_its_broker_beyond_the_grace_is_not_ready(
    postgres_server_url: str, broker: EmbeddedMosquitto
) -> None:
    from services.licensing.keys import load_keyring

    customer_id = str(uuid.uuid4())
    keyring = load_keyring(Path(license_keys_dir()))

    @get("/jwks")
    async def jwks() -> dict[str, Any]:
        return keyring.jwks()

    database = await create_database(postgres_server_url)
    async with serving(Litestar([jwks])) as control, TcpRelay(broker.url) as relay:
        settings = msgspec.convert(
            {
                "instance_customer_id": customer_id,
                "database_url": database,
                "license_jwt": signed_license_issued(customer_id, plan="professional").jwt,
                "license_jwks_url": f"{control.base_url}/jwks",
                "control_plane_url": str(control.base_url),
                "mqtt_host": "127.0.0.1",
                "mqtt_port": relay.port,
                "mqtt_username": f"instance-{uuid.uuid4().hex[:8]}",
                "mqtt_password": "p" * 32,
                "mqtt_admin_username": broker.admin_username,
                "mqtt_admin_password": broker.admin_password,
                "ingest_broker_grace_seconds": 1.0,
                "monitoring_token": "m" * 40,
            },
            InstanceSettings,
        )
        async with serving(create_instance_app(settings)) as instance:

            async def health() -> Any:
                return await instance.get("/health/ready", headers=MONITORING)

            ready = await eventually(health, lambda r: r.status_code == 200, what="ready")
            assert ready.json()["broker"] == {"ok": True, "disconnected_seconds": 0.0}
            relay.go_down()
            cut = await eventually(health, lambda r: r.status_code == 503, what="not ready")
            assert cut.json()["broker"]["ok"] is False
            assert cut.json()["broker"]["disconnected_seconds"] >= 1.0
            # A stranger is told which check failed, and nothing more.
            public = await instance.get("/health/ready")
            assert public.json() == {"status": "not_ready", "failed": ["broker"]}
            relay.come_back()
            await eventually(health, lambda r: r.status_code == 200, timeout=30, what="back")
