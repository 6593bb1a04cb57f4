"""A customer's instance as the customer uses it: devices with their own broker credentials,
readings over MQTT into the API, isolation from devices and customers, rejected payloads,
license limits and read-only mode. Everything real: the control plane, the provisioner's local
backend, Postgres, NATS, Mosquitto and the instance process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import asyncpg
import httpx
import pytest

from contracts import TrialExpired
from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.runtime.platform import Platform
from libs.servers.mosquitto import EmbeddedMosquitto
from services.provisioner.backends.local.backend import instance_name
from services.provisioner.backends.local.processes import instances_running
from services.targets import CONTROL_PLANE, build_app
from support import eventually, local_backend_settings, serving, with_database

pytestmark = pytest.mark.slow

PASSWORD = "a long passphrase"


@pytest.fixture(scope="module")
async def client(
    settings: ServiceSettings,
    store: EventStore,
    broker: EmbeddedMosquitto,
    port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[httpx.AsyncClient]:
    platform = Platform.from_settings(
        settings,
        list(CONTROL_PLANE.values()),
        **local_backend_settings(
            broker,
            port,
            tmp_path_factory.mktemp("instances"),
            # The webhook receiver below listens on loopback, which webhooks may not reach
            # unless the operator allows it.
            alert_webhook_allowed_cidrs="127.0.0.0/8",
        ),
    )
    async with serving(build_app(platform, "all"), port) as http:
        await platform.wait_started()
        yield http


class Customer:
    """A signed-up customer, their session, and their instance."""

    def __init__(self, customer_id: str, token: str, url: str) -> None:
        self.id = customer_id
        self.auth = {"Authorization": f"Bearer {token}"}
        self.api = httpx.AsyncClient(base_url=url, timeout=10, headers=self.auth)


async def customer(client: httpx.AsyncClient, email: str) -> Customer:
    signed = await client.post(
        "/api/customers/signup",
        json={"email": email, "password": PASSWORD, "company_name": "Air Co"},
    )
    assert signed.status_code == 201, signed.text
    token = (
        await client.post("/api/customers/login", json={"email": email, "password": PASSWORD})
    ).json()["token"]
    me = await eventually(
        lambda: client.get("/api/customers/me", headers={"Authorization": f"Bearer {token}"}),
        lambda r: r.json()["deployment"]["status"] == "ready",
        timeout=60,
        what="the customer's instance",
    )
    return Customer(
        signed.json()["customer"]["customer_id"], token, me.json()["deployment"]["instance_url"]
    )


@pytest.fixture(scope="module")
async def alice(client) -> AsyncIterator[Customer]:
    found = await customer(client, "alice@example.com")
    yield found
    await found.api.aclose()


@pytest.fixture(scope="module")
async def bob(client) -> AsyncIterator[Customer]:
    found = await customer(client, "bob@example.com")
    yield found
    await found.api.aclose()


def reading(**overrides: Any) -> bytes:
    body = {
        "ts": datetime.now(UTC).isoformat(),
        "temperature": 21.5,
        "humidity": 45.2,
        "pressure": 1013.2,
        "gas_resistance": 125000.0,
        "iaq": 42.0,
        "iaq_accuracy": 3,
        "co2_equivalent": 612.0,
        "breath_voc_equivalent": 0.8,
    }
    body.update(overrides)
    return json.dumps(body).encode()


async def register(c: Customer, name: str) -> dict[str, Any]:
    answer = await c.api.post("/api/devices", json={"name": name})
    assert answer.status_code == 201, answer.text
    return answer.json()


@contextlib.asynccontextmanager
async def instance_database(server_url: str, c: Customer) -> AsyncIterator[asyncpg.Connection]:
    """The customer's instance database, as the server's owner (to count what is stored)."""
    conn = await asyncpg.connect(
        with_database(server_url, instance_name(c.id)), server_settings={"search_path": "instance"}
    )
    try:
        yield conn
    finally:
        await conn.close()


async def stored_of(conn: asyncpg.Connection, device_id: str) -> dict[str, int]:
    """A device's rows, its distinct readings and how many its temperature rollups count."""
    row = await conn.fetchrow(
        """
        SELECT (SELECT count(*) FROM readings WHERE device_id = $1) AS rows,
               (SELECT count(DISTINCT ts) FROM readings WHERE device_id = $1) AS readings,
               (SELECT coalesce(sum(n), 0)::bigint FROM readings_hourly
                WHERE device_id = $1 AND metric = 'temperature') AS rolled_up
        """,
        device_id,
    )
    return dict(row)


async def received_within(mqtt: aiomqtt.Client, seconds: float) -> list[str]:
    """Topics of the messages a client gets within ``seconds``."""
    got: list[str] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            async for message in mqtt.messages:
                got.append(str(message.topic))
    return got


def device_client(broker: EmbeddedMosquitto, device: dict[str, Any]) -> aiomqtt.Client:
    mqtt = device["mqtt"]
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=mqtt["username"],
        password=mqtt["password"],
        identifier=mqtt["client_id"],
    )


async def test_a_published_reading_is_returned_by_the_api(alice, broker) -> None:
    device = await register(alice, "kitchen")
    assert (
        device["mqtt"]["topics"]["readings"] == f"{alice.id}/devices/{device['device_id']}/readings"
    )
    assert device["mqtt"]["urls"] == [f"mqtt://{broker.host}:{broker.port}"]
    async with device_client(broker, device) as mqtt:
        await mqtt.publish(device["mqtt"]["topics"]["status"], b"online", qos=1)
        await mqtt.publish(device["mqtt"]["topics"]["readings"], reading(temperature=23.25), qos=1)
    listed = await eventually(
        lambda: alice.api.get("/api/devices"),
        lambda r: any(d["latest"] for d in r.json()["devices"]),
        what="the reading stored",
    )
    mine = next(d for d in listed.json()["devices"] if d["device_id"] == device["device_id"])
    assert mine["latest"]["temperature"] == pytest.approx(23.25)
    assert mine["online"] is True
    assert "password" not in json.dumps(listed.json())
    series = await alice.api.get(
        f"/api/devices/{device['device_id']}/readings",
        params={"bucket": "1m", "metrics": "temperature,iaq"},
    )
    assert series.status_code == 200, series.text
    points = series.json()["series"]["temperature"]
    assert len(points) == 1 and points[0]["avg"] == pytest.approx(23.25)
    assert set(series.json()["series"]) == {"temperature", "iaq"}
    month = await alice.api.get(
        f"/api/devices/{device['device_id']}/readings",
        params={"bucket": "1d", "from": (datetime.now(UTC) - timedelta(days=30)).isoformat()},
    )
    assert month.json()["source"] == "rollups"
    assert month.json()["series"]["temperature"][0]["max"] == pytest.approx(23.25)
    exported = await alice.api.get(f"/api/devices/{device['device_id']}/readings.csv")
    assert exported.status_code == 200
    assert exported.text.splitlines()[0].startswith("ts,temperature,humidity")
    assert len(exported.text.splitlines()) == 2


async def test_bad_payloads_are_dead_lettered_and_ingest_goes_on(alice, broker) -> None:
    device = await register(alice, "hallway")
    topic = device["mqtt"]["topics"]["readings"]
    async with device_client(broker, device) as mqtt:
        for payload in (
            b"{not json",
            reading(humidity=140),
            reading(ts="yesterday"),
            b'{"ts": 1, "temperature": 20}',
            b"x" * 5000,
            reading(ts="0001-01-01T00:00:00+01:00"),  # outside what a datetime holds in UTC
            reading(temperature=19.0),
        ):
            await mqtt.publish(topic, payload, qos=1)
    await eventually(
        lambda: alice.api.get(f"/api/devices/{device['device_id']}"),
        lambda r: r.json()["latest"] is not None,
        what="the good reading after the bad ones",
    )
    dead = (await alice.api.get("/api/dead-letters")).json()["dead_letters"]
    reasons = [d["reason"] for d in dead if d["device_id"] == device["device_id"]]
    assert len(reasons) == 6
    assert any(r.startswith("malformed") for r in reasons)
    assert "invalid: ts is out of range" in reasons
    assert any(r.startswith("oversized") for r in reasons)
    assert any("humidity" in r for r in reasons)
    usage = (await alice.api.get("/api/usage")).json()
    assert usage["rejected_readings"] >= 6


async def test_a_reading_published_twice_is_stored_and_counted_once(
    alice, broker, postgres_server_url
) -> None:
    """A device that sends the same reading again (its own retry, or a gateway's) adds
    nothing: one row, one count in the rollups and in the day's messages."""
    device = await register(alice, "retrying")
    mqtt = device["mqtt"]
    now = datetime.now(UTC).replace(microsecond=0)
    again = reading(ts=(now - timedelta(seconds=5)).isoformat(), temperature=19.5)
    marker = reading(ts=now.isoformat(), temperature=20.5)
    used = (await alice.api.get("/api/usage")).json()["mqtt_messages"]["used"]
    for payload in (again, again, marker):
        published = await asyncio.create_subprocess_exec(
            *("mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-q", "1"),
            *("-u", mqtt["username"], "-P", mqtt["password"], "-i", mqtt["client_id"]),
            *("-t", mqtt["topics"]["readings"], "-m", payload.decode()),
        )
        assert await published.wait() == 0
    # The broker hands ingest one device's messages in order: once the marker is stored,
    # both copies were taken.
    await eventually(
        lambda: alice.api.get("/api/readings/latest"),
        lambda r: (r.json()["latest"].get(device["device_id"]) or {}).get("temperature") == 20.5,
        what="the marker reading stored",
    )
    async with instance_database(postgres_server_url, alice) as conn:
        assert await stored_of(conn, device["device_id"]) == {
            "rows": 2,
            "readings": 2,
            "rolled_up": 2,
        }
    usage = await alice.api.get("/api/usage")
    assert usage.json()["mqtt_messages"]["used"] == used + 2


async def test_a_device_cannot_publish_as_another_nor_subscribe(alice, broker) -> None:
    a = await register(alice, "device a")
    b = await register(alice, "device b")
    async with device_client(broker, a) as mqtt:
        await mqtt.publish(b["mqtt"]["topics"]["readings"], reading(temperature=30.0), qos=1)
        await mqtt.subscribe(f"{alice.id}/#")
        await mqtt.publish(a["mqtt"]["topics"]["readings"], reading(temperature=20.0), qos=1)
        # A device receives nothing, not even its own readings.
        assert await received_within(mqtt, 1.0) == []
    await eventually(
        lambda: alice.api.get(f"/api/devices/{a['device_id']}"),
        lambda r: r.json()["latest"] is not None,
        what="device a's own reading",
    )
    assert (await alice.api.get(f"/api/devices/{b['device_id']}")).json()["latest"] is None


async def test_deleting_a_device_revokes_its_credentials_at_once(alice, broker) -> None:
    device = await register(alice, "to delete")
    async with device_client(broker, device):
        pass
    assert (await alice.api.delete(f"/api/devices/{device['device_id']}")).status_code == 204
    with pytest.raises(aiomqtt.MqttError):
        async with device_client(broker, device):
            pass
    assert (await alice.api.get(f"/api/devices/{device['device_id']}")).status_code == 404


async def test_customers_and_strangers_see_nothing_of_each_other(alice, bob, broker) -> None:
    device = await register(alice, "private")
    bobs_view = httpx.AsyncClient(base_url=str(alice.api.base_url), headers=bob.auth, timeout=10)
    async with bobs_view:
        assert (await bobs_view.get("/api/devices")).status_code == 404
        assert (
            await bobs_view.get(f"/api/devices/{device['device_id']}/readings")
        ).status_code == 404
        assert (await bobs_view.post("/api/devices", json={"name": "x"})).status_code == 404
    async with httpx.AsyncClient(base_url=str(alice.api.base_url)) as anonymous:
        assert (await anonymous.get("/api/devices")).status_code == 401
    bobs_device = await register(bob, "bob's")
    async with device_client(broker, bobs_device) as mqtt:
        await mqtt.subscribe(f"{alice.id}/#")
        assert await received_within(mqtt, 1.0) == []


async def test_the_eleventh_device_on_starter_is_refused(bob) -> None:
    listed = (await bob.api.get("/api/devices")).json()["devices"]
    for index in range(10 - len(listed)):
        await register(bob, f"sensor {index}")
    refused = await bob.api.post("/api/devices", json={"name": "one too many"})
    assert refused.status_code == 403
    assert "10 devices" in refused.json()["error"]["message"]
    bad = await bob.api.post("/api/devices", json={"nom": "x"})
    assert bad.status_code == 400
    assert {f["field"] for f in bad.json()["error"]["fields"]} == {"nom", "name"}


async def test_after_the_license_expires_ingest_stops_and_queries_work(
    client, store, broker
) -> None:
    carol = await customer(client, f"crash-{uuid.uuid4().hex[:8]}@example.com")
    try:
        device = await register(carol, "last one")
        async with device_client(broker, device) as mqtt:
            await mqtt.publish(
                device["mqtt"]["topics"]["readings"], reading(temperature=18.0), qos=1
            )
        await eventually(
            lambda: carol.api.get(f"/api/devices/{device['device_id']}"),
            lambda r: r.json()["latest"] is not None,
            what="a reading before expiry",
        )
        # The trial ends unpaid: licensing issues a final license, the instance is updated.
        await store.publish(
            TrialExpired(customer_id=carol.id, trial_ended_at=datetime.now(UTC)),
            customer_id=carol.id,
        )
        await eventually(
            lambda: carol.api.get("/api/license"),
            lambda r: r.json().get("mode") == "read-only",
            timeout=60,
            what="the instance read-only",
        )
        async with device_client(broker, device) as mqtt:
            await mqtt.publish(
                device["mqtt"]["topics"]["readings"], reading(temperature=99.0 - 70), qos=1
            )
        await eventually(
            lambda: carol.api.get("/api/dead-letters"),
            lambda r: any(d["reason"].startswith("read-only") for d in r.json()["dead_letters"]),
            what="the reading refused",
        )
        latest = (await carol.api.get(f"/api/devices/{device['device_id']}")).json()["latest"]
        assert latest["temperature"] == pytest.approx(18.0)
        refused = await carol.api.post("/api/devices", json={"name": "new"})
        assert refused.status_code == 403
        assert "read-only" in refused.json()["error"]["message"]
    finally:
        await carol.api.aclose()


async def test_usage_reaches_billing_and_only_from_the_instance(client, alice) -> None:
    from contracts.credentials import instance_usage_token

    # Alice's instance has stored readings by now (earlier tests); it reports within seconds.
    today = datetime.now(UTC).date().isoformat()
    usage = await eventually(
        lambda: client.get("/api/billing/usage", headers=alice.auth),
        lambda r: any(d["day"] == today and d["mqtt_messages"] > 0 for d in r.json()["days"]),
        timeout=30,
        what="today's usage recorded by billing",
    )
    days = {d["day"]: d for d in usage.json()["days"]}
    assert days[today]["devices"] >= 1 and days[today]["storage_bytes"] > 0
    yesterday = (datetime.now(UTC).date() - timedelta(days=1)).isoformat()
    assert days[yesterday]["final"] is True
    report = {
        "day": today,
        "devices": 0,
        "mqtt_messages": 0,
        "api_requests": 0,
        "rejected_readings": 0,
        "storage_bytes": 0,
    }
    path = f"/api/instances/{alice.id}/usage"
    assert (await client.post(path, json=report)).status_code == 401
    forged = {"Authorization": f"Bearer {instance_usage_token('u' * 40, str(uuid.uuid4()))}"}
    assert (await client.post(path, json=report, headers=forged)).status_code == 401
    own = {"Authorization": f"Bearer {instance_usage_token('u' * 40, alice.id)}"}
    bad = await client.post(path, json={**report, "mqtt_messages": -1}, headers=own)
    assert bad.status_code == 400
    accepted = await client.post(path, json=report, headers=own)
    assert accepted.status_code == 202
    assert accepted.json() == {"recorded": True, "day": today, "final": False}


async def test_an_alert_fires_resolves_and_its_webhook_verifies(
    client, store, broker, alice
) -> None:
    from litestar import Litestar, Request, post

    from contracts import SubscriptionActivated
    from services.instance.alerts.webhooks import sign

    received: list[dict[str, Any]] = []
    failures = {"left": 1}

    @post("/hook", status_code=200)
    async def hook(request: Request[Any, Any, Any]) -> dict[str, bool]:
        body = (await request.body()).decode()
        received.append({"headers": dict(request.headers), "body": body})
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("the receiver is down once")  # answers 500: retried
        return {"ok": True}

    dave = await customer(client, "dave@example.com")
    try:
        starter = await alice.api.post(
            "/api/alerts/rules",
            json={
                "metric": "temperature",
                "operator": ">",
                "threshold": 30,
                "webhook_url": "http://127.0.0.1:9/x",
            },
        )
        assert starter.status_code == 403, starter.text  # webhooks are not in the starter plan
        await store.publish(
            SubscriptionActivated(
                customer_id=dave.id,
                plan="professional",
                status="active",
                stripe_customer_id="cus_dave",
                stripe_subscription_id="sub_dave",
            ),
            customer_id=dave.id,
        )
        await eventually(
            lambda: dave.api.get("/api/license"),
            lambda r: r.json().get("plan") == "professional",
            timeout=60,
            what="the professional license on the instance",
        )
        async with serving(Litestar([hook], debug=False)) as receiver:
            device = await register(dave, "greenhouse")
            silent = await register(dave, "silent one")
            bad = await dave.api.post("/api/alerts/rules", json={"metric": "warmth"})
            assert bad.status_code == 400 and bad.json()["error"]["fields"][0]["field"] == "metric"
            no_url = await dave.api.post(
                "/api/alerts/rules",
                json={"metric": "no_data", "webhook_url": "https://[::1"},
            )
            assert no_url.status_code == 400, no_url.text
            assert no_url.json()["error"]["fields"] == [
                {"field": "webhook_url", "reason": "is not a valid URL"}
            ]
            assert "Traceback" not in no_url.text
            rule = await dave.api.post(
                "/api/alerts/rules",
                json={
                    "name": "too hot",
                    "metric": "temperature",
                    "operator": ">",
                    "threshold": 30,
                    "for_seconds": 2,
                    "devices": [device["device_id"]],
                    "webhook_url": f"{receiver.base_url}/hook",
                },
            )
            assert rule.status_code == 201, rule.text
            secret = rule.json()["webhook_secret"]
            quiet = await dave.api.post(
                "/api/alerts/rules",
                json={"metric": "no_data", "for_seconds": 3, "devices": [silent["device_id"]]},
            )
            assert quiet.status_code == 201
            topic = device["mqtt"]["topics"]["readings"]
            async with device_client(broker, device) as mqtt:
                for _ in range(10):
                    await mqtt.publish(topic, reading(temperature=35.0), qos=1)
                    await asyncio.sleep(0.5)
                await eventually(
                    lambda: dave.api.get("/api/alerts/history"),
                    lambda r: any(
                        h["event"] == "firing" and h["device_id"] == device["device_id"]
                        for h in r.json()["history"]
                    ),
                    what="the alert firing",
                )
                await mqtt.publish(topic, reading(temperature=20.0), qos=1)
            history = await eventually(
                lambda: dave.api.get("/api/alerts/history"),
                lambda r: any(h["event"] == "resolved" for h in r.json()["history"]),
                what="the alert resolved",
            )
            events = [(h["device_id"], h["event"]) for h in reversed(history.json()["history"])]
            assert (device["device_id"], "firing") in events
            assert events.index((device["device_id"], "firing")) < events.index(
                (device["device_id"], "resolved")
            )
            assert (silent["device_id"], "firing") in events  # no data for 3 s
            await eventually(
                lambda: asyncio.sleep(0, len(received)),
                lambda n: n >= 3,
                timeout=30,
                what="the firing (failed once, retried) and resolved webhooks",
            )
        bodies = [json.loads(r["body"]) for r in received]
        assert [b["event"] for b in bodies] == ["firing", "firing", "resolved"]
        for delivery in received:
            headers = delivery["headers"]
            expected = sign(secret, headers["x-iotistic-timestamp"], delivery["body"])
            assert headers["x-iotistic-signature"] == expected
        assert sign("not the secret", headers["x-iotistic-timestamp"], delivery["body"]) != expected
    finally:
        await dave.api.aclose()


async def test_simulate_publishes_realistic_readings(client, tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    erin = await customer(client, "erin@example.com")
    try:
        command = [
            str(Path(sys.executable).parent / "iotistic"),
            "--data-dir",
            str(tmp_path),
            "simulate",
            "--customer",
            erin.id,
            "--email",
            "erin@example.com",
            "--devices",
            "2",
            "--rate",
            "8/s",
            "--duration",
            "2",
            "--url",
            str(client.base_url),
        ]
        env = {"PATH": "/usr/bin:/bin", "IOTISTIC_PASSWORD": PASSWORD}
        run = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, timeout=60, env=env
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert (tmp_path / "simulate" / f"{erin.id}.json").stat().st_mode & 0o077 == 0
        listed = await eventually(
            lambda: erin.api.get("/api/devices"),
            lambda r: (
                len(r.json()["devices"]) == 2 and all(d["latest"] for d in r.json()["devices"])
            ),
            what="both simulated devices reporting",
        )
        for device in listed.json()["devices"]:
            latest = device["latest"]
            assert 10 < latest["temperature"] < 35 and 15 <= latest["humidity"] <= 95
            assert 950 < latest["pressure"] < 1080 and 0 <= latest["iaq"] <= 500
        usage = (await erin.api.get("/api/usage")).json()
        assert usage["mqtt_messages"]["used"] >= 10
        # A second run reuses the devices it registered.
        again = await asyncio.to_thread(
            subprocess.run,
            [*command[:-4], "--duration", "0.5", *command[-2:]],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert again.returncode == 0, again.stderr
        assert len((await erin.api.get("/api/devices")).json()["devices"]) == 2
    finally:
        await erin.api.aclose()


async def test_the_dashboard_shows_a_published_reading_live_in_chromium(client, broker) -> None:
    import shutil

    from playwright.async_api import async_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: apt-get install chromium (the CI script does)"
    frank = await customer(client, "frank@example.com")
    try:
        device = await register(frank, "office")
        base = str(frank.api.base_url).rstrip("/")
        requested: list[str] = []
        async with async_playwright() as driver:
            browser = await driver.chromium.launch(
                executable_path=chromium, args=["--no-sandbox", "--disable-gpu"]
            )
            try:
                page = await browser.new_page()
                page.on("request", lambda r: requested.append(r.url))
                await page.goto(base + "/")
                await page.wait_for_selector("#login-form", state="visible")
                await page.fill("#email", "frank@example.com")
                await page.fill("#password", PASSWORD)
                await page.click("button[type=submit]")
                await page.wait_for_function("() => window.dashboardReady === true", timeout=20_000)
                assert "office" in await page.inner_text("#devices")
                async with device_client(broker, device) as mqtt:
                    await mqtt.publish(
                        device["mqtt"]["topics"]["readings"], reading(temperature=27.125), qos=1
                    )
                await page.wait_for_function(
                    "() => { const c = document.getElementById('chart-temperature');"
                    " return !!(c && c.data && c.data[0].y.includes(27.125)); }",
                    timeout=20_000,
                )
                cookies = await page.context.cookies()
                session = next(c for c in cookies if c["name"] == "iotistic_session")
                assert session["httpOnly"] is True and session["sameSite"] == "Strict"
            finally:
                await browser.close()
        # Everything the page loaded came from the instance itself: no CDN.
        assert requested and all(url.startswith(base) for url in requested), requested
    finally:
        await frank.api.aclose()


async def test_readings_in_flight_when_the_instance_is_killed_are_all_stored_once(
    client, broker, postgres_server_url
) -> None:
    """Ingest acknowledges a reading to the broker only once it is stored: a ``kill -9`` in
    the middle of a stream loses nothing (the broker keeps the session and delivers the rest
    to the restarted instance), and what was stored but not yet acknowledged when it died,
    delivered again, is stored, rolled up and counted once."""
    carol = await customer(client, f"crash-{uuid.uuid4().hex[:8]}@example.com")
    device = await register(carol, "crash test")
    topic = device["mqtt"]["topics"]["readings"]
    pid = instances_running()[carol.id]
    start = (datetime.now(UTC) - timedelta(minutes=10)).replace(microsecond=0)
    count = 3000
    async with device_client(broker, device) as mqtt:
        for index in range(count):
            ts = (start + timedelta(milliseconds=10 * index)).isoformat()
            await mqtt.publish(topic, reading(ts=ts, temperature=10 + index % 30), qos=1)
            if index == count // 3:
                os.kill(pid, signal.SIGKILL)
    stored = await eventually(
        lambda: carol.api.get(
            f"/api/devices/{device['device_id']}/readings.csv",
            params={"from": start.isoformat()},
        ),
        lambda r: r.status_code == 200 and len(r.text.splitlines()) - 1 >= count,
        timeout=90,
        what="every reading stored after the restart",
    )
    times = [line.split(",")[0] for line in stored.text.splitlines()[1:]]
    assert len(times) == len(set(times)) == count  # each one, once
    async with instance_database(postgres_server_url, carol) as conn:
        assert await stored_of(conn, device["device_id"]) == {
            "rows": count,
            "readings": count,
            "rolled_up": count,
        }
        assert await conn.fetchval("SELECT sum(mqtt_messages) FROM usage_days") == count
    assert instances_running()[carol.id] != pid
    await carol.api.aclose()


async def _connections_of(server_url: str, role: str) -> int:
    conn = await asyncpg.connect(server_url)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role)
        )
    finally:
        await conn.close()


async def test_an_idle_instance_holds_at_most_one_database_connection(
    client, postgres_server_url
) -> None:
    # Hundreds of instances share one Postgres: a burst may open several connections, but
    # once it is over the instance keeps one, whatever it does while idle (alerts, usage).
    dave = await customer(client, "dave@example.com")
    role = instance_name(dave.id)
    answers = await asyncio.gather(*(dave.api.get("/api/devices") for _ in range(30)))
    assert {a.status_code for a in answers} == {200}
    assert await _connections_of(postgres_server_url, role) > 1  # the burst took several
    await eventually(
        lambda: _connections_of(postgres_server_url, role),
        lambda held: held <= 1,
        timeout=30,
        interval=0.5,
        what="the instance back to at most one connection",
    )
    # And it stays so over several passes of its periodic tasks (alerts run every 2 s).
    held = []
    for _ in range(12):
        held.append(await _connections_of(postgres_server_url, role))
        await asyncio.sleep(0.5)
    assert max(held) <= 1, held
    await dave.api.aclose()


async def test_readiness_of_an_idle_instance_says_when_its_database_is_lost(
    client, postgres_server_url
) -> None:
    # The idle pool's one connection must not hide a database that went away: readiness
    # checks it, and says when it works again.
    erin = await customer(client, "erin@example.com")
    role = instance_name(erin.id)
    ready = await erin.api.get("/health/ready")
    assert ready.status_code == 200, ready.text
    admin = await asyncpg.connect(postgres_server_url)
    try:
        await admin.execute(f'ALTER ROLE "{role}" NOLOGIN')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        lost = await eventually(
            lambda: erin.api.get("/health/ready"),
            lambda r: r.status_code == 503,
            what="readiness to say the database is lost",
        )
        assert "database" in lost.json()["failed"]
    finally:
        await admin.execute(f'ALTER ROLE "{role}" LOGIN')
        await admin.close()
    await eventually(
        lambda: erin.api.get("/health/ready"),
        lambda r: r.status_code == 200,
        what="readiness back once the database is",
    )
    await erin.api.aclose()
