"""A short `./dev fuzz`: schemathesis over every operation of the control plane and of a
customer's instance, over HTTP, authenticated; no answer may be 500 or more. The full run
(``./dev fuzz``, its figures in the README) has the same cases, more of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.servers.mosquitto import EmbeddedMosquitto
from tests.security.fuzz import control_plane_credential, fuzz_api
from tests.security.tenant_platform import World, running_world

pytestmark = pytest.mark.slow

EXAMPLES = 6
SECONDS = 20.0


@pytest.fixture(scope="module")
async def world(
    settings: ServiceSettings,
    store: EventStore,
    broker: EmbeddedMosquitto,
    port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[World]:
    async with running_world(settings, broker, port, tmp_path_factory.mktemp("world")) as found:
        yield found


async def test_no_operation_of_the_control_plane_answers_5xx(world: World) -> None:
    report = await asyncio.to_thread(
        fuzz_api,
        str(world.control.base_url).rstrip("/"),
        control_plane_credential(world.admin, world.tenant.auth),
        examples=EXAMPLES,
        seconds=SECONDS,
        known={"customer_id": world.tenant.customer_id},
        name="control plane",
    )
    assert report.server_errors == [], report.summary()
    assert report.transport_errors == [], report.summary()
    assert report.operations >= 25 and report.cases >= 2 * report.operations, report.summary()


async def test_no_operation_of_the_instance_answers_5xx(world: World) -> None:
    device = await world.instance.post("/api/devices", json={"name": "fuzzed"})
    assert device.status_code == 201, device.text
    report = await asyncio.to_thread(
        fuzz_api,
        world.tenant.instance_url,
        lambda _: world.tenant.auth,
        examples=EXAMPLES,
        seconds=SECONDS,
        known={"device_id": device.json()["device_id"]},
        name="instance",
    )
    assert report.server_errors == [], report.summary()
    assert report.transport_errors == [], report.summary()
    assert report.operations >= 15 and report.cases >= 2 * report.operations, report.summary()


async def test_the_readings_routes_declare_their_parameters(world: World) -> None:
    # Undeclared, they were out of every fuzzer's reach (issue 11, item 7).
    paths = (await world.instance.get("/schema/openapi.json")).json()["paths"]
    declared = {
        route: {p["name"]: p for p in paths[route]["get"]["parameters"] if p["in"] == "query"}
        for route in ("/api/devices/{device_id}/readings", "/api/devices/{device_id}/readings.csv")
    }
    readings, csv = declared.values()
    assert set(readings) == {"from", "to", "bucket", "metrics"}
    assert set(csv) == {"from", "to"}
    assert readings["bucket"]["schema"]["enum"] == ["1m", "5m", "1h", "1d"]
    assert readings["metrics"]["schema"]["maxLength"] < 200
    assert "1970-01-01" in readings["to"]["description"]
    assert {"type": "string", "format": "date-time"} in readings["to"]["schema"]["oneOf"]
