"""``iotistic simulate --format original``: simulated devices register themselves with a
provisioning key, exchange their keys, publish batches in the original agent's format (each
reading with its own timestamp, pressure in Pa) and report the configuration they applied.
The command runs as a customer runs it, against the real control plane, instance, Postgres,
NATS and Mosquitto; the sensor model's and the configuration's rules are checked directly too.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tcp_relay import TcpRelay
from test_instance import PASSWORD, client, customer  # noqa: F401 - client is a fixture

from services.instance.simulate import SensorModel
from services.instance.simulate_original import (
    AppliedConfig,
    SimulatedAgent,
    batch,
    fleet_devices,
    original_message,
)
from support import eventually


def test_a_batch_carries_readings_as_the_bme68x_driver_gives_them() -> None:
    model = SensorModel(seed=3)
    start = datetime(2026, 12, 7, 12, tzinfo=UTC)
    messages = [original_message(model.next(start + timedelta(seconds=i))) for i in range(3)]
    body = json.loads(batch(messages, start + timedelta(seconds=3)))
    assert body["sensor"] == "bme688" and body["timestamp"].startswith("2026-12-07T12:00:03")
    stamps = [m["timestamp"] for m in body["messages"]]
    assert len(set(stamps)) == 3 and stamps[0].startswith("2026-12-07T12:00:00")
    for message in body["messages"]:
        assert 95_000 < message["pressure"] < 108_000  # Pa
        assert "ts" not in message and message["sensor_name"] == "bme688"
        assert 10 < message["temperature"] < 35 and message["gas_resistance"] > 0


def test_a_configuration_sets_the_pace_and_the_offset_is_left_to_the_instance() -> None:
    config = AppliedConfig(interval=0.5)
    desired = {
        "version": 4,
        "reporting_interval": 30,
        "temperature_offset": -1.5,
        "heater_profile": "HP-354",
        "custom": {"led": False},
    }
    report = config.apply(json.dumps(desired).encode())
    assert report is not None and config.interval == 30
    assert json.loads(report) == {
        "version": 4,
        "reporting_interval": 30,
        "heater_profile": "HP-354",
        "custom": {"led": False},
    }
    # A cleared retained configuration, or anything but a versioned object, changes nothing.
    for payload in (b"", b"not json", b"[1]", b'{"reporting_interval": 5}'):
        assert config.apply(payload) is None
    assert config.interval == 30 and config.version == 4


def simulate(data_dir: Path, customer_id: str, base_url: str, *extra: str) -> list[str]:
    return [
        str(Path(sys.executable).parent / "iotistic"),
        "--data-dir",
        str(data_dir),
        "simulate",
        "--customer",
        customer_id,
        "--email",
        "olga@example.com",
        "--format",
        "original",
        "--rate",
        "8/s",
        "--url",
        base_url,
        *extra,
    ]


async def run(command: list[str]) -> None:
    env = {"PATH": "/usr/bin:/bin", "IOTISTIC_PASSWORD": PASSWORD}
    if "PYTHONPATH" in os.environ:  # the code under test, where it is not the installed one
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    done = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=90, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
async def test_simulate_original_provisions_devices_that_publish_batches(
    client,  # noqa: F811
    tmp_path,
) -> None:
    olga = await customer(client, "olga@example.com")
    base = str(client.base_url)
    try:
        await run(simulate(tmp_path, olga.id, base, "--devices", "2", "--duration", "3"))
        store = tmp_path / "simulate" / f"{olga.id}.json"
        assert store.stat().st_mode & 0o077 == 0
        kept = json.loads(store.read_text())
        uuids = {e["uuid"] for e in kept}
        assert len(uuids) == 2 and all(e["format"] == "original" for e in kept)

        listed = await eventually(
            lambda: olga.api.get("/api/devices"),
            lambda r: (
                len(r.json()["devices"]) == 2 and all(d["latest"] for d in r.json()["devices"])
            ),
            what="both simulated agents' readings",
        )
        devices = listed.json()["devices"]
        assert {d["uuid"] for d in devices} == uuids
        assert all(d["provisioning"] == "provisioned" for d in devices)
        assert all(950 < d["latest"]["pressure"] < 1080 for d in devices)  # sent in Pa
        # The key made for the run registered both and was revoked after.
        (made,) = (await olga.api.get("/api/provisioning-keys")).json()["keys"]
        assert made["state"] == "revoked" and made["uses"] == 2 and made["devices"] == 2

        # Each reading keeps its own time: a batch of three is three instants, not one.
        now = datetime.now(UTC)
        exported = await olga.api.get(
            f"/api/devices/{devices[0]['device_id']}/readings.csv",
            params={"from": (now - timedelta(minutes=5)).isoformat(), "to": now.isoformat()},
        )
        rows = list(csv.DictReader(io.StringIO(exported.text)))
        stamps = [r["ts"] for r in rows]
        assert len(rows) >= 6 and len(set(stamps)) == len(rows), exported.text

        # A configuration set for one device reaches it on the next run (retained), which
        # reuses both devices and registers a third with the key it is given.
        first = devices[0]["device_id"]
        desired = {"reporting_interval": 2, "temperature_offset": -1.5, "heater_profile": "HP-354"}
        put = await olga.api.put(f"/api/devices/{first}/config", json=desired)
        assert put.status_code == 200, put.text
        key = await olga.api.post("/api/provisioning-keys", json={"name": "installers"})
        assert key.status_code == 201, key.text
        await run(
            simulate(
                tmp_path,
                olga.id,
                base,
                "--devices",
                "3",
                "--duration",
                "3",
                "--provisioning-key",
                key.json()["key"],
            )
        )
        config = await eventually(
            lambda: olga.api.get(f"/api/devices/{first}/config"),
            lambda r: r.json()["in_sync"],
            what="the device's report of its configuration",
        )
        reported = config.json()["reported"]
        assert reported["reporting_interval"] == 2 and reported["heater_profile"] == "HP-354"
        assert "temperature_offset" not in reported  # left to the instance to apply
        after = (await olga.api.get("/api/devices")).json()["devices"]
        assert len(after) == 3 and uuids < {d["uuid"] for d in after}
        keys = {k["name"]: k for k in (await olga.api.get("/api/provisioning-keys")).json()["keys"]}
        assert len(keys) == 2 and keys["installers"]["uses"] == 1
    finally:
        await olga.api.aclose()


@pytest.mark.slow
async def test_a_simulated_agent_reconnects_and_sends_what_it_kept(
    client,  # noqa: F811
    broker,
    tmp_path,
) -> None:
    pia = await customer(client, "pia@example.com")
    token = pia.auth["Authorization"].removeprefix("Bearer ")
    try:
        (device,) = await fleet_devices(str(pia.api.base_url), token, 1, tmp_path / "kept.json")
        agent = SimulatedAgent(device, SensorModel(5), AppliedConfig(0.2), deadline=None)
        loop = asyncio.get_running_loop()

        async def stored() -> int:
            listed = (await pia.api.get("/api/devices")).json()["devices"]
            now = datetime.now(UTC)
            exported = await pia.api.get(
                f"/api/devices/{listed[0]['device_id']}/readings.csv",
                params={"from": (now - timedelta(minutes=5)).isoformat(), "to": now.isoformat()},
            )
            return len(exported.text.splitlines()) - 1

        async with TcpRelay(f"mqtt://{broker.host}:{broker.port}") as relay:
            running = asyncio.create_task(agent.run(f"mqtt://127.0.0.1:{relay.port}"))
            await eventually(stored, lambda n: n >= 3, what="readings before the outage")
            relay.go_down()
            relay.come_back()
            await eventually(
                lambda: asyncio.sleep(0, agent.connections), lambda n: n >= 2, what="a reconnection"
            )
            agent.deadline = loop.time() + 1.0
            sent = await asyncio.wait_for(running, 30)
        # Every reading it counted as sent is stored once: none lost in the outage, none twice.
        await eventually(stored, lambda n: n == sent, what=f"all {sent} readings stored")
    finally:
        await pia.api.aclose()
