"""A device's status with its firmware version: a JSON status stores the version it reports and
the API shows it; the plain ``online`` status works as before; a malformed status or a bad
version is a dead letter that changes nothing; other customers, and other customers' devices,
neither see nor set it. Everything real: the control plane, the instance, Postgres, NATS and
Mosquitto.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from test_instance import (  # noqa: F401 - client is a fixture
    Customer,
    client,
    customer,
    device_client,
    register,
)

from libs.servers.mosquitto import EmbeddedMosquitto
from support import eventually

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def jane(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "jane@example.com")
    yield found
    await found.api.aclose()


@pytest.fixture(scope="module")
async def karl(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "karl@example.com")
    yield found
    await found.api.aclose()


async def status(broker: EmbeddedMosquitto, device: dict[str, Any], *payloads: bytes) -> None:
    async with device_client(broker, device) as mqtt:
        for payload in payloads:
            await mqtt.publish(device["mqtt"]["topics"]["status"], payload, qos=1)


def state(firmware: str, **more: Any) -> bytes:
    return json.dumps({"state": "online", "firmware": firmware, **more}).encode()


async def listed(c: Customer, device_id: str) -> dict[str, Any]:
    devices = (await c.api.get("/api/devices")).json()["devices"]
    return next(d for d in devices if d["device_id"] == device_id)


async def test_a_reported_firmware_shows_and_a_later_one_replaces_it(jane, broker) -> None:
    device = await register(jane, "boiler room")
    path = f"/api/devices/{device['device_id']}"
    fresh = (await jane.api.get(path)).json()
    assert fresh["firmware"] is None and fresh["firmware_reported_at"] is None
    # Keys the instance does not know are ignored.
    await status(broker, device, state("1.4.2", uptime=12, rssi=-60))
    first = await eventually(
        lambda: jane.api.get(path),
        lambda r: r.json()["firmware"] == "1.4.2",
        what="the reported firmware",
    )
    assert first.json()["online"] is True and first.json()["firmware_reported_at"]
    assert (await listed(jane, device["device_id"]))["firmware"] == "1.4.2"

    await status(broker, device, state("1.5.0-rc.1 (build 77)"))
    later = await eventually(
        lambda: jane.api.get(path),
        lambda r: r.json()["firmware"] == "1.5.0-rc.1 (build 77)",
        what="the later firmware",
    )
    reported = [datetime.fromisoformat(r.json()["firmware_reported_at"]) for r in (first, later)]
    assert reported[1] > reported[0]

    # A JSON "offline" (a last will) takes the device offline and keeps its firmware.
    await status(broker, device, b'{"state": "offline"}')
    gone = await eventually(
        lambda: jane.api.get(path), lambda r: r.json()["online"] is False, what="offline"
    )
    assert gone.json()["firmware"] == "1.5.0-rc.1 (build 77)"


async def test_a_plain_status_works_as_before(jane, broker) -> None:
    device = await register(jane, "plain")
    path = f"/api/devices/{device['device_id']}"
    await status(broker, device, b"online")
    seen = await eventually(
        lambda: jane.api.get(path), lambda r: r.json()["online"] is True, what="online"
    )
    assert seen.json()["firmware"] is None
    await status(broker, device, b'"OFFLINE"')
    await eventually(
        lambda: jane.api.get(path), lambda r: r.json()["online"] is False, what="offline"
    )
    dead = (await jane.api.get("/api/dead-letters")).json()["dead_letters"]
    assert not [d for d in dead if d["device_id"] == device["device_id"]]


async def test_a_bad_status_is_a_dead_letter_and_changes_nothing(jane, broker) -> None:
    device = await register(jane, "flaky")
    path = f"/api/devices/{device['device_id']}"
    await status(broker, device, state("2.0.0"))
    before = (
        await eventually(
            lambda: jane.api.get(path), lambda r: r.json()["firmware"] == "2.0.0", what="2.0.0"
        )
    ).json()
    bad = (
        b'{"state": "offline", "firmware": "3.0',  # cut short
        json.dumps({"state": "offline", "firmware": "9" * 65}).encode(),
        json.dumps({"state": "offline", "firmware": "1.0\n<script>"}).encode(),
        json.dumps({"state": "offline", "firmware": 3}).encode(),
        json.dumps({"state": "asleep", "firmware": "3.0.0"}).encode(),
        b'{"firmware": "3.0.0"}',
        b"{" + b" " * 5000 + b"}",
    )
    await status(broker, device, *bad)
    dead = await eventually(
        lambda: jane.api.get("/api/dead-letters"),
        lambda r: (
            len([d for d in r.json()["dead_letters"] if d["device_id"] == device["device_id"]])
            == len(bad)
        ),
        what="the bad statuses dead-lettered",
    )
    reasons = [
        d["reason"] for d in dead.json()["dead_letters"] if d["device_id"] == device["device_id"]
    ]
    assert all(
        d["topic"].endswith("/status")
        for d in dead.json()["dead_letters"]
        if d["device_id"] == device["device_id"]
    )
    assert sum(r.startswith("status malformed:") for r in reasons) == 1
    assert sum(r.startswith("status oversized:") for r in reasons) == 1
    firmware_reasons = [r for r in reasons if "firmware must be 1 to 64 printable" in r]
    assert len(firmware_reasons) == 3, reasons
    assert any("state" in r and r.startswith("status invalid:") for r in reasons)
    after = (await jane.api.get(path)).json()
    assert after["firmware"] == "2.0.0" and after["online"] is True
    assert after["firmware_reported_at"] == before["firmware_reported_at"]
    assert after["last_seen"] == before["last_seen"]


async def test_other_customers_neither_see_nor_set_it(jane, karl, broker) -> None:
    device = await register(jane, "secret version")
    path = f"/api/devices/{device['device_id']}"
    await status(broker, device, state("7.7.7"))
    await eventually(
        lambda: jane.api.get(path), lambda r: r.json()["firmware"] == "7.7.7", what="7.7.7"
    )
    karls_view = httpx.AsyncClient(base_url=str(jane.api.base_url), headers=karl.auth, timeout=10)
    async with karls_view:
        assert (await karls_view.get("/api/devices")).status_code == 404
        assert (await karls_view.get(path)).status_code == 404
    assert "7.7.7" not in (await karl.api.get("/api/devices")).text
    # Karl's device cannot report a version for Jane's: the broker refuses the topic.
    karls_device = await register(karl, "intruder")
    async with device_client(broker, karls_device) as mqtt:
        await mqtt.publish(device["mqtt"]["topics"]["status"], state("6.6.6"), qos=1)
    # The broker drops a refused message as it arrives: a version Jane's device reports after
    # it is the one shown, and 6.6.6 never was.
    await status(broker, device, state("7.7.8"))
    await eventually(
        lambda: jane.api.get(path), lambda r: r.json()["firmware"] == "7.7.8", what="7.7.8"
    )
    dead = (await jane.api.get("/api/dead-letters")).text
    assert "6.6.6" not in dead
