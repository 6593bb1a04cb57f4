"""A device's BME688 calibration through the instance's API, on a real instance: the state in
the device list, the calibration with its run, changes and what calibration usually takes,
readings taken before calibration marked in the CSV export (column ``calibrating``) and in the
charts' buckets (raw and from the rollups), and nothing of it for another customer. Everything
real: the control plane, the instance, Postgres, NATS and Mosquitto.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from test_instance import (  # noqa: F401 - client is a fixture
    Customer,
    client,
    customer,
    device_client,
    reading,
    register,
)

from libs.servers.mosquitto import EmbeddedMosquitto
from support import eventually

pytestmark = pytest.mark.slow

NO_BSEC = {"iaq": None, "iaq_accuracy": None, "co2_equivalent": None, "breath_voc_equivalent": None}


@pytest.fixture(scope="module")
async def kim(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "kim@example.com")
    yield found
    await found.api.aclose()


@pytest.fixture(scope="module")
async def lee(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "lee@example.com")
    yield found
    await found.api.aclose()


async def publish(
    broker: EmbeddedMosquitto, device: dict[str, Any], sent: list[tuple[datetime, dict[str, Any]]]
) -> None:
    async with device_client(broker, device) as mqtt:
        for at, values in sent:
            body = reading(ts=at.isoformat(), **values)
            await mqtt.publish(device["mqtt"]["topics"]["readings"], body, qos=1)


async def exported(c: Customer, device_id: str, start: datetime) -> list[dict[str, str]]:
    answer = await c.api.get(
        f"/api/devices/{device_id}/readings.csv", params={"from": start.isoformat()}
    )
    assert answer.status_code == 200, answer.text
    return list(csv.DictReader(io.StringIO(answer.text)))


def z(at: datetime) -> str:
    """A time as the API writes it."""
    return at.isoformat().replace("+00:00", "Z")


def listed(answer: httpx.Response, device_id: str) -> dict[str, Any]:
    return next(d for d in answer.json()["devices"] if d["device_id"] == device_id)


async def test_calibration_is_shown_in_the_api_the_csv_and_the_charts(kim, lee, broker) -> None:
    device, bare = await register(kim, "lab"), await register(kim, "no bsec")
    lab, plain = device["device_id"], bare["device_id"]
    start = (datetime.now(UTC) - timedelta(hours=3)).replace(second=0, microsecond=0)
    at = [start + timedelta(minutes=m) for m in (0, 1, 2, 60, 120, 121)]
    await publish(
        broker,
        device,
        [(at[i], {"iaq_accuracy": accuracy}) for i, accuracy in enumerate((0, 0, 1, 2))],
    )
    await publish(broker, bare, [(at[0], NO_BSEC)])
    devices = await eventually(
        lambda: kim.api.get("/api/devices"),
        lambda r: (
            listed(r, lab)["calibration"]["iaq_accuracy"] == 2
            and listed(r, plain)["latest"] is not None
        ),
        what="the readings stored",
    )
    shown = listed(devices, lab)["calibration"]
    assert (shown["state"], shown["run_started"], shown["since"]) == (
        "calibrating",
        z(at[0]),
        z(at[2]),
    )
    assert shown["expected"]["text"] == "usually 4 days for a new sensor"
    assert shown["expected"]["so_far_seconds"] >= 2 * 3600
    assert listed(devices, plain)["calibration"]["state"] == "unknown"
    one = (await kim.api.get(f"/api/devices/{lab}")).json()["calibration"]
    assert one["state"] == "calibrating"

    calibration = (await kim.api.get(f"/api/devices/{lab}/calibration")).json()
    assert calibration["first_seen"] == z(at[0])
    assert [(c["from"], c["to"]) for c in calibration["changes"]] == [
        ("stabilising", "calibrating"),
        ("unknown", "stabilising"),
    ]
    assert calibration["runs"] == [
        {
            "started_at": z(at[0]),
            "calibrated_at": None,
            "seconds_to_calibrated": None,
            "ended_at": None,
            "ended_by": None,
        }
    ]
    assert calibration["temperature_offset"] is None
    rows = await exported(kim, lab, start)
    assert list(rows[0])[-2:] == ["temperature_offset", "calibrating"]
    assert [r["calibrating"] for r in rows] == ["true"] * 4
    assert [r["calibrating"] for r in await exported(kim, plain, start)] == ["false"]

    # The charts: the minutes that held them (raw readings), and the day (from the rollups).
    path = f"/api/devices/{lab}/readings"
    minutes = (
        await kim.api.get(
            path, params={"bucket": "1m", "from": start.isoformat(), "to": at[5].isoformat()}
        )
    ).json()
    assert minutes["calibrating"] == [
        {"from": z(at[0]), "to": z(at[2] + timedelta(minutes=1))},
        {"from": z(at[3]), "to": z(at[3] + timedelta(minutes=1))},
    ]
    month = (
        await kim.api.get(
            path,
            params={"bucket": "1d", "from": (start - timedelta(days=30)).isoformat()},
        )
    ).json()
    assert month["source"] == "rollups" and month["calibrating"]
    assert month["calibrating"][0]["from"] <= z(at[0]) < month["calibrating"][-1]["to"]

    # Calibrated two hours after the first reading.
    await publish(broker, device, [(at[4], {"iaq_accuracy": 3}), (at[5], {"iaq_accuracy": 3})])
    done = await eventually(
        lambda: kim.api.get(f"/api/devices/{lab}/calibration"),
        lambda r: r.json()["last_reading"] == z(at[5]),
        what="the calibrated readings",
    )
    calibration = done.json()
    assert (calibration["state"], calibration["since"], calibration["expected"]) == (
        "calibrated",
        z(at[4]),
        None,
    )
    assert calibration["runs"][0]["seconds_to_calibrated"] == 2 * 3600
    assert [r["calibrating"] for r in await exported(kim, lab, start)] == ["true"] * 4 + [
        "false"
    ] * 2

    # Another customer, or a device that is not there: nothing.
    async with httpx.AsyncClient(base_url=str(kim.api.base_url), headers=lee.auth) as other:
        assert (await other.get(f"/api/devices/{lab}/calibration")).status_code == 404
    assert (await kim.api.get("/api/devices/nosuchdevice/calibration")).status_code == 404
