"""`iotistic simulate --format original`: simulated devices that run the original Iotistic
agent's protocol, through the fleet provisioning flow.

Each device chooses a uuid and a random ``deviceApiKey``, registers itself with a provisioning
key (``POST /api/v1/device/register``), proves it holds its key
(``POST /api/v1/device/{uuid}/key-exchange``), then publishes with the broker credentials it
was answered: batches of a few readings, each with its own timestamp, on
``iot/device/<uuid>/sensor/bme688`` (QoS 1, pressure in Pa as the BME68x driver gives it), and
heartbeats on ``iot/device/<uuid>/sensor/heartbeat`` (QoS 0). It subscribes to its desired
configuration (``iot/device/<uuid>/config``, retained) and reports what it applied on
``.../config/reported``: the reporting interval sets its pace; it does not correct its own
temperature (no ``temperature_offset`` in the report), so the instance applies the offset.

The provisioning key is the one given, or one made for the run with the customer's session
(as many uses as devices to register, an hour to live) and revoked once they are registered.
Credentials are kept with the native simulator's in ``<data dir>/simulate/<customer>.json``
(mode 0600); each entry is written before the request that needs it, so a run stopped halfway
finishes the registration the next time (a repeat registration of a pending uuid with the same
``deviceApiKey`` is answered again).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import ssl
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
import httpx
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from libs.runtime.supervision import retrying
from services.instance.simulate import SensorModel, remember, remembered

FORMAT = "original"
DEVICE_TYPE = "bme688-simulated"
SENSOR = "bme688"
HEARTBEAT = "heartbeat"
BATCH = 3  # readings a batch, as the agent buffers a few between publishes
HEARTBEAT_SECONDS = 30.0
KEY_LIFETIME = timedelta(hours=1)
PORTS = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}
# CONNACK codes of credentials refused: bad user name or password, not authorised (MQTT 3.1.1
# and MQTT 5, as paho reports them).
REFUSED = {4, 5, 134, 135}


class CredentialsRefused(Exception):
    """The broker refuses a simulated device's credentials (the device was deleted)."""


def original_message(reading: dict[str, Any]) -> dict[str, Any]:
    """One native reading (``SensorModel.next``) as the original agent sends it: its time under
    ``timestamp``, the sensor's name, pressure in Pa."""
    message = {k: v for k, v in reading.items() if k != "ts"}
    message["timestamp"] = reading["ts"]
    message["pressure"] = round(reading["pressure"] * 100, 1)
    message["sensor_name"] = SENSOR
    return message


def batch(messages: list[dict[str, Any]], now: datetime) -> bytes:
    """A readings batch: ``{"sensor", "timestamp", "messages"}``."""
    body = {"sensor": SENSOR, "timestamp": now.isoformat(timespec="milliseconds")}
    return json.dumps({**body, "messages": messages}).encode()


@dataclass
class AppliedConfig:
    """What the device applied of its desired configuration."""

    interval: float
    version: int = 0
    applied: dict[str, Any] = field(default_factory=dict)

    def apply(self, payload: bytes) -> bytes | None:
        """Take a desired configuration; the report to publish, or None for nothing to apply
        (an empty retained message clears it; anything not a versioned object is ignored)."""
        try:
            desired = json.loads(payload) if payload else None
        except ValueError:
            return None
        if not isinstance(desired, dict) or not isinstance(desired.get("version"), int):
            return None
        interval = desired.get("reporting_interval")
        if isinstance(interval, int | float) and not isinstance(interval, bool) and interval > 0:
            self.interval = float(interval)
        # The temperature offset is left to the instance: the device does not correct itself.
        self.applied = {
            k: v for k, v in desired.items() if k not in ("version", "temperature_offset")
        }
        self.version = desired["version"]
        return json.dumps({"version": self.version, **self.applied}).encode()


# --- registration --------------------------------------------------------------------------------
def _new_device(number: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "uuid": str(uuid.uuid4()),
        "deviceApiKey": secrets.token_urlsafe(32),
        "deviceName": f"simulated agent {number}",
    }


def _answered(answer: httpx.Response, what: str, *codes: int) -> dict[str, Any]:
    if answer.status_code not in codes:
        raise SystemExit(f"{what} failed: {answer.status_code} {answer.text}")
    return answer.json() if answer.content else {}


async def _run_key(api: httpx.AsyncClient, uses: int) -> tuple[str, str]:
    """A provisioning key for this run's registrations: its id and the key."""
    expires = datetime.now(UTC) + KEY_LIFETIME
    made = _answered(
        await api.post(
            "/api/provisioning-keys",
            json={"name": "iotistic simulate", "max_uses": uses, "expires_at": expires.isoformat()},
        ),
        "creating a provisioning key",
        201,
    )
    return made["key_id"], made["key"]


async def _register(devices: httpx.AsyncClient, key: str, entry: dict[str, Any]) -> None:
    body = {
        "uuid": entry["uuid"],
        "deviceName": entry["deviceName"],
        "deviceType": DEVICE_TYPE,
        "deviceApiKey": entry["deviceApiKey"],
    }
    answer = await devices.post(
        "/api/v1/device/register", json=body, headers={"Authorization": f"Bearer {key}"}
    )
    registered = _answered(answer, f"registering {entry['uuid']}", 200)
    entry["id"], entry["mqtt"] = registered["id"], registered["mqtt"]


async def _key_exchange(devices: httpx.AsyncClient, entry: dict[str, Any]) -> None:
    answer = await devices.post(
        f"/api/v1/device/{entry['uuid']}/key-exchange",
        headers={"Authorization": f"Bearer {entry['deviceApiKey']}"},
    )
    entry["status"] = _answered(answer, f"the key exchange of {entry['uuid']}", 200)["status"]


async def fleet_devices(
    instance_url: str, token: str, count: int, store: Path, provisioning_key: str | None = None
) -> list[dict[str, Any]]:
    """``count`` provisioned devices: the ones remembered, plus new ones registered."""
    entries = remembered(store)
    others = [e for e in entries if e.get("format") != FORMAT]
    auth = {"Authorization": f"Bearer {token}"}
    async with (
        httpx.AsyncClient(base_url=instance_url, headers=auth, timeout=15) as api,
        httpx.AsyncClient(base_url=instance_url, timeout=30) as devices,
    ):
        listed = {
            d.get("uuid")
            for d in _answered(await api.get("/api/devices"), "listing", 200)["devices"]
        }
        # Those deleted since are forgotten; those whose registration was never answered are not.
        mine = [
            e
            for e in entries
            if e.get("format") == FORMAT and (e["uuid"] in listed or "mqtt" not in e)
        ][:count]
        while len(mine) < count:
            mine.append(_new_device(len(mine) + 1))

        def save() -> None:
            remember(store, others + mine)

        save()
        todo = [e for e in mine if "mqtt" not in e]
        if todo:
            key_id, key = (
                (None, provisioning_key) if provisioning_key else await _run_key(api, len(todo))
            )
            try:
                for entry in todo:
                    await _register(devices, key, entry)
                    save()
            finally:
                if key_id:  # made for this run: of no use once they are registered
                    await api.delete(f"/api/provisioning-keys/{key_id}")
        for entry in mine:
            if entry.get("status") != "provisioned":
                await _key_exchange(devices, entry)
                save()
    return mine


# --- publishing ----------------------------------------------------------------------------------
def _client(mqtt: dict[str, Any], broker: str | None) -> aiomqtt.Client:
    """A broker connection with the device's credentials, at ``broker`` (default: the first
    broker URL it was answered)."""
    url = urlsplit(broker or mqtt["broker"])
    websockets = url.scheme in ("ws", "wss")
    return aiomqtt.Client(
        url.hostname or "127.0.0.1",
        url.port or PORTS.get(url.scheme, 1883),
        username=mqtt["username"],
        password=mqtt["password"],
        identifier=mqtt["clientId"],
        transport="websockets" if websockets else "tcp",
        websocket_path=(url.path or "/mqtt") if websockets else None,
        tls_context=ssl.create_default_context() if url.scheme in ("mqtts", "wss") else None,
    )


def _refused(exc: MqttConnectError) -> bool:
    """Whether the broker refused the credentials (not: was unavailable)."""
    code = exc.rc.value if isinstance(exc.rc, ReasonCode) else exc.rc
    return code in REFUSED


@dataclass
class SimulatedAgent:
    """One device running the original agent: it publishes until ``deadline`` (the event
    loop's time; None: until cancelled) and, like the agent, reconnects when the broker goes
    away, keeping the readings it could not send yet."""

    device: dict[str, Any]
    model: SensorModel
    config: AppliedConfig
    deadline: float | None
    sent: int = 0
    connections: int = 0
    buffered: list[dict[str, Any]] = field(default_factory=list)

    @property
    def root(self) -> str:
        return f"iot/device/{self.device['uuid']}"

    def _over(self) -> bool:
        return self.deadline is not None and asyncio.get_running_loop().time() >= self.deadline

    async def run(self, broker: str | None = None) -> int:
        """Publish until the deadline, across reconnections; how many readings were sent.
        ``CredentialsRefused`` when the broker no longer takes the device's credentials."""
        async for attempt in retrying((aiomqtt.MqttError,), wait_max=10.0):
            if attempt.num > 1 and self._over():
                break  # the broker stayed away to the end
            with attempt:
                try:
                    await self._connected(broker)
                except MqttConnectError as exc:
                    if _refused(exc):
                        raise CredentialsRefused(
                            f"the broker refuses the credentials of {self.device['uuid']} "
                            f"({exc}): was it deleted? The next run registers another"
                        ) from exc
                    raise
        return self.sent

    async def _connected(self, broker: str | None) -> None:
        async with _client(self.device["mqtt"], broker) as client:
            self.connections += 1
            await client.subscribe(f"{self.root}/config", qos=1)
            listener = asyncio.create_task(self._listen(client))
            try:
                await self._publish(client, listener)
            finally:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await listener

    async def _listen(self, client: aiomqtt.Client) -> None:
        """Apply each desired configuration that arrives, and report it."""
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            report = self.config.apply(payload)
            if report is not None:
                await client.publish(f"{self.root}/config/reported", report, qos=1)

    async def _publish(self, client: aiomqtt.Client, listener: asyncio.Task[None]) -> None:
        loop = asyncio.get_running_loop()
        last_beat = loop.time() - HEARTBEAT_SECONDS  # one heartbeat on every connection
        while not self._over():
            if listener.done():
                listener.result()  # the connection it lost ends this one too
            now = datetime.now(UTC)
            if loop.time() - last_beat >= HEARTBEAT_SECONDS:
                last_beat = loop.time()
                beat = json.dumps({"status": "online", "timestamp": now.isoformat()})
                await client.publish(f"{self.root}/sensor/{HEARTBEAT}", beat, qos=0)
            self.buffered.append(original_message(self.model.next(now)))
            if len(self.buffered) >= BATCH:
                await self._send(client)
            pause = self.config.interval
            if self.deadline is not None:
                pause = min(pause, self.deadline - loop.time())
            await asyncio.sleep(max(0.0, pause))
        if self.buffered:
            await self._send(client)

    async def _send(self, client: aiomqtt.Client) -> None:
        body = batch(self.buffered, datetime.now(UTC))
        await client.publish(f"{self.root}/sensor/{SENSOR}", body, qos=1)
        self.sent, self.buffered = self.sent + len(self.buffered), []


async def publish_original(
    devices: list[dict[str, Any]], rate: float, duration: float | None, broker: str | None = None
) -> int:
    """Run every device, ``rate`` readings a second in all (until a configuration sets a
    device's own pace); how many readings were sent."""
    loop = asyncio.get_running_loop()
    deadline = None if duration is None else loop.time() + duration
    interval = len(devices) / rate
    agents = [
        SimulatedAgent(d, SensorModel(i), AppliedConfig(interval), deadline)
        for i, d in enumerate(devices)
    ]
    return sum(await asyncio.gather(*(agent.run(broker) for agent in agents)))
