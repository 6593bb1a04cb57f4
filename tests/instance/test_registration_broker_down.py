"""A fleet registration while the broker is away is answered 502 and keeps nothing: no device,
no use of the key, no failure counted against the caller; once the broker is back the same
registration succeeds. A real instance app, Postgres and Mosquitto, through a TCP relay that the
test takes down and brings back.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from fleet_steps import new_api_key, new_uuid, post_registration, registration_body
from litestar import Litestar, get
from tcp_relay import TcpRelay

from libs.servers.mosquitto import EmbeddedMosquitto
from services.instance.app import create_instance_app
from services.instance.provisioning_keys import key_hash
from services.instance.settings import InstanceSettings
from support import create_database, eventually, license_keys_dir, serving, signed_license_issued

pytestmark = pytest.mark.slow

MONITORING = {"Authorization": "Bearer " + "m" * 40}
KEY = "iotpk_" + "k" * 43


async def test_a_registration_while_the_broker_is_away_keeps_nothing(
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
                "monitoring_token": "m" * 40,
            },
            InstanceSettings,
        )
        async with serving(create_instance_app(settings)) as instance:
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
                body = registration_body(new_uuid(), new_api_key())
                relay.go_down()
                away = await post_registration(str(instance.base_url), KEY, body)
                assert away.status_code == 502, away.text
                assert "broker" in away.json()["error"]["message"]
                assert await conn.fetchval("SELECT count(*) FROM devices") == 0
                assert await conn.fetchval("SELECT uses FROM provisioning_keys") == 0
                assert await conn.fetchval("SELECT count(*) FROM registration_failures") == 0
                audit = await conn.fetchrow("SELECT outcome, key_id FROM registration_audit")
                assert dict(audit) == {"outcome": "refused", "key_id": "pk_test"}

                relay.come_back()
                back = await post_registration(str(instance.base_url), KEY, body)
                assert back.status_code == 200, back.text
                assert await conn.fetchval("SELECT count(*) FROM devices") == 1
                assert await conn.fetchval("SELECT uses FROM provisioning_keys") == 1
            finally:
                await conn.close()
