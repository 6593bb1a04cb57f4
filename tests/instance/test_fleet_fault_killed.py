"""The instance process is killed (SIGKILL) in the middle of a registration: after the broker
made the device's client and the fleet role's rights, before the database commit (its COMMIT
never reaches Postgres: the relay swallows it, the process is killed while it waits).

The device never got its answer. The instance is started again: it is ready, the database has
nothing of the registration (no device, no use of the key) and the broker's leftover client
does not block the device: its next registration is answered 200 (the orphan adopted), it
connects with the new password and its reading is stored.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from fleet_fault_steps import KEY, MONITORING
from fleet_steps import (
    fleet_mqtt_client,
    new_api_key,
    new_uuid,
    post_registration,
    registration_body,
)
from litestar import Litestar, get
from tcp_relay import TcpRelay

from libs.mqtt.dynsec import DynSec
from libs.servers.mosquitto import EmbeddedMosquitto
from libs.servers.ports import free_port
from services.instance import fleet
from services.instance.provisioning_keys import key_hash
from support import create_database, eventually, license_keys_dir, serving, signed_license_issued

pytestmark = pytest.mark.slow


@contextmanager
def instance_process(
    env: dict[str, str], port: int, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m services.instance`` with ``env``; killed at the end if still running."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.instance", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


async def test_an_instance_killed_mid_registration_keeps_nothing_and_the_device_registers_again(
    postgres_server_url: str, broker: EmbeddedMosquitto, tmp_path: Path
) -> None:
    from services.licensing.keys import load_keyring

    customer_id = str(uuid.uuid4())
    keyring = load_keyring(Path(license_keys_dir()))

    @get("/jwks")
    async def jwks() -> dict[str, Any]:
        return keyring.jwks()

    database = await create_database(postgres_server_url)
    relay = TcpRelay(postgres_server_url)
    async with serving(Litestar([jwks])) as control, relay:
        through_relay = urlsplit(database)
        through_relay = through_relay._replace(
            netloc=through_relay.netloc.rsplit(":", 1)[0] + f":{relay.port}"
        )
        ingest_user = f"instance-{uuid.uuid4().hex[:8]}"
        env = {
            "INSTANCE_CUSTOMER_ID": customer_id,
            "DATABASE_URL": urlunsplit(through_relay),
            "LICENSE_JWT": signed_license_issued(customer_id, plan="professional").jwt,
            "LICENSE_JWKS_URL": f"{control.base_url}/jwks",
            "CONTROL_PLANE_URL": str(control.base_url),
            "MQTT_HOST": broker.host,
            "MQTT_PORT": str(broker.port),
            "MQTT_USERNAME": ingest_user,
            "MQTT_PASSWORD": "p" * 32,
            "MQTT_ADMIN_USERNAME": broker.admin_username,
            "MQTT_ADMIN_PASSWORD": broker.admin_password,
            "MONITORING_TOKEN": "m" * 40,
        }
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = tmp_path / "instance.log"

        async def ready() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=5) as http:
                await eventually(
                    lambda: http.get("/health/ready", headers=MONITORING),
                    lambda r: r.status_code == 200,
                    timeout=60,
                    what="the instance ready",
                )

        body = registration_body(new_uuid(), new_api_key())
        device_uuid = body["uuid"]
        db = await asyncpg.connect(database, server_settings={"search_path": "instance"})
        try:
            with instance_process(env, port, log) as first:
                await ready()
                await db.execute(
                    "INSERT INTO provisioning_keys (key_id, name, key_hash, created_at) "
                    "VALUES ('pk_test', 'test', $1, now())",
                    key_hash(KEY),
                )
                # Armed by the relay itself on the registration's connection: the COMMIT
                # cannot slip through before the test reacts, however busy the machine.
                relay.swallow_client_at(b"COMMIT", after=b"UPDATE provisioning_keys SET uses")
                registering = asyncio.create_task(post_registration(url, KEY, body))
                await first_of(relay.swallowed, registering)
                first.send_signal(signal.SIGKILL)
                first.wait(10)
                with pytest.raises(httpx.HTTPError):
                    await registering  # the answer is lost with the process

            async with DynSec(
                broker.host, broker.port, broker.admin_username, broker.admin_password
            ) as dynsec:
                orphan = await dynsec.get_client(fleet.broker_username(device_uuid))
            assert orphan is not None  # the broker made it before the kill
            await eventually(
                lambda: db.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted"),
                lambda n: n == 0,
                what="the killed process's transaction rolled back",
            )
            assert await db.fetchval("SELECT count(*) FROM devices") == 0
            assert await db.fetchval("SELECT uses FROM provisioning_keys") == 0

            with instance_process(env, port, log):
                await ready()
                again = await post_registration(url, KEY, body)
                assert again.status_code == 200, again.text
                device = again.json()
                assert await db.fetchval("SELECT uses FROM provisioning_keys") == 1
                now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
                reading = {
                    "temperature": 21.5,
                    "humidity": 45.0,
                    "pressure": 101325.0,
                    "gas_resistance": 125000.0,
                    "timestamp": now,
                }
                async with fleet_mqtt_client(broker, device) as mqtt:
                    await mqtt.publish(
                        fleet.sensor_topic(device_uuid, "bme688"),
                        json.dumps({"sensor": "bme688", "timestamp": now, "messages": [reading]}),
                        qos=1,
                    )
                await eventually(
                    lambda: db.fetchval(
                        "SELECT count(*) FROM readings WHERE device_id = $1", device["id"]
                    ),
                    lambda n: n == 1,
                    what="the re-registered device's reading stored",
                )
        finally:
            await db.close()


async def first_of(event: asyncio.Event, request: asyncio.Task[httpx.Response]) -> None:
    """Wait for ``event``; fail with the answer if the request ended first (a 503 on a busy
    machine, say) instead of waiting for ever."""
    waiter = asyncio.ensure_future(event.wait())
    done, _ = await asyncio.wait({waiter, request}, return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        answer = request.result()
        pytest.fail(f"the registration ended before its COMMIT: {answer.status_code} {answer.text}")
