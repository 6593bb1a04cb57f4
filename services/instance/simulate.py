"""`iotistic simulate`: devices that publish realistic BME688 readings through the broker.

Each simulated device follows a daily temperature cycle (warmest mid-afternoon), humidity that
moves against it, slowly drifting pressure, sensor noise, and now and then an "IAQ episode"
(someone cooking, a window shut) in which the air-quality index climbs for a few minutes and
decays, with gas resistance falling and CO2 and VOC equivalents rising with it. Devices are
registered on the customer's instance through its API; their credentials are kept in
``<data dir>/simulate/<customer>.json`` (mode 0600) so a second run reuses them.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import httpx


@dataclass
class SensorModel:
    """One device's air, evolving reading by reading."""

    seed: int
    pressure: float = 1013.0
    episode_left: int = 0
    episode_peak: float = 0.0
    iaq: float = 40.0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)  # noqa: S311 - sensor noise, not secrets
        self.offset = self.rng.uniform(-1.5, 1.5)  # rooms differ a little

    def next(self, now: datetime) -> dict[str, Any]:
        """The next reading at ``now``, as a device publishes it."""
        rng = self.rng
        hours = now.hour + now.minute / 60 + now.second / 3600
        daily = math.sin(2 * math.pi * (hours - 9) / 24)  # peaks at 15:00
        temperature = 21.0 + self.offset + 3.0 * daily + rng.gauss(0, 0.15)
        humidity = min(95.0, max(15.0, 45.0 - 8.0 * daily + rng.gauss(0, 0.8)))
        self.pressure += rng.gauss(0, 0.05) + (1013.0 - self.pressure) * 0.001
        if self.episode_left == 0 and rng.random() < 0.002:
            self.episode_left, self.episode_peak = rng.randint(60, 300), rng.uniform(120, 260)
        target = self.episode_peak if self.episode_left > 0 else 35.0 + 10 * rng.random()
        self.episode_left = max(0, self.episode_left - 1)
        self.iaq += (target - self.iaq) * 0.05 + rng.gauss(0, 1.5)
        self.iaq = min(500.0, max(0.0, self.iaq))
        return {
            "ts": now.isoformat(timespec="milliseconds"),
            "temperature": round(temperature, 2),
            "humidity": round(humidity, 2),
            "pressure": round(self.pressure, 2),
            "gas_resistance": round(
                max(5_000.0, 250_000.0 - self.iaq * 800 + rng.gauss(0, 2000)), 0
            ),
            "iaq": round(self.iaq, 1),
            "iaq_accuracy": 3,
            "co2_equivalent": round(400 + self.iaq * 4.5, 1),
            "breath_voc_equivalent": round(0.5 + self.iaq / 60, 3),
        }


async def session(control_plane: str, email: str, password: str) -> tuple[str, str, str]:
    """Sign in: the customer's id, session token and instance URL."""
    async with httpx.AsyncClient(base_url=control_plane, timeout=15) as client:
        login = await client.post(
            "/api/customers/login", json={"email": email, "password": password}
        )
        if login.status_code != 200:
            raise SystemExit(f"sign-in failed: {login.status_code} {login.text}")
        token = login.json()["token"]
        me = (
            await client.get("/api/customers/me", headers={"Authorization": f"Bearer {token}"})
        ).json()
    url = me["deployment"]["instance_url"]
    if not url:
        raise SystemExit("the customer's instance is not deployed yet; try again in a moment")
    return me["customer"]["customer_id"], token, url


def remembered(store: Path) -> list[dict[str, Any]]:
    """The devices a run kept (both formats'; ``"format": "original"`` marks the fleet ones)."""
    return json.loads(store.read_text()) if store.exists() else []


def remember(store: Path, devices: list[dict[str, Any]]) -> None:
    """Keep ``devices`` for the next run, readable by the user only (they hold passwords);
    written whole or not at all."""
    store.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = store.with_name(store.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(devices, handle)
    os.replace(partial, store)


async def devices_for(
    instance_url: str, token: str, count: int, store: Path
) -> list[dict[str, Any]]:
    """``count`` devices with credentials: the ones remembered, plus new ones registered."""
    entries = remembered(store)
    others = [d for d in entries if d.get("format", "native") != "native"]
    async with httpx.AsyncClient(
        base_url=instance_url, headers={"Authorization": f"Bearer {token}"}, timeout=15
    ) as api:
        listed = {d["device_id"] for d in (await api.get("/api/devices")).json()["devices"]}
        known = [d for d in entries if d not in others and d["device_id"] in listed]
        while len(known) < count:
            answer = await api.post("/api/devices", json={"name": f"simulated {len(known) + 1}"})
            if answer.status_code != 201:
                raise SystemExit(f"registering a device failed: {answer.status_code} {answer.text}")
            known.append(answer.json())
    remember(store, others + known)
    return known[:count]


async def publish(
    devices: list[dict[str, Any]], rate: float, duration: float | None, host: str | None = None
) -> int:
    """Publish ``rate`` readings a second in all, spread over the devices; how many were sent."""
    interval = len(devices) / rate
    deadline = None if duration is None else asyncio.get_running_loop().time() + duration
    sent = 0

    async def one(device: dict[str, Any], seed: int) -> None:
        nonlocal sent
        model = SensorModel(seed)
        mqtt = device["mqtt"]
        async with aiomqtt.Client(
            host or mqtt["host"],
            mqtt["port"],
            username=mqtt["username"],
            password=mqtt["password"],
            # The broker takes the credentials only with the device's own client id (its
            # device id; devices remembered from before the answer said so have none stored).
            identifier=mqtt.get("client_id") or device["device_id"],
        ) as client:
            await client.publish(mqtt["topics"]["status"], b"online", qos=1)
            loop = asyncio.get_running_loop()
            while deadline is None or loop.time() < deadline:
                body = json.dumps(model.next(datetime.now(UTC)))
                await client.publish(mqtt["topics"]["readings"], body, qos=1)
                sent += 1
                await asyncio.sleep(interval)
            await client.publish(mqtt["topics"]["status"], b"offline", qos=1)

    await asyncio.gather(*(one(d, i) for i, d in enumerate(devices)))
    return sent
