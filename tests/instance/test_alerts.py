"""Alerting on a real instance app (its own Postgres database, its lifespan's alert loop, a
real webhook receiver over HTTP): a rule that cannot be evaluated or delivered, stored before
rules were checked as they are now, stops neither the loop nor the other rules, and is
counted where monitoring sees it."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from litestar import Litestar, Request, get, post

from libs.db.postgres import load_migrations, migrate
from libs.servers.ports import free_port
from services.instance.alerts.targets import WebhookTargets
from services.instance.app import create_instance_app
from services.instance.readings import store_readings
from services.instance.settings import InstanceSettings
from support import create_database, eventually, license_keys_dir, serving, signed_license_issued

pytestmark = pytest.mark.slow

MONITORING = {"Authorization": "Bearer " + "m" * 40}


async def insert_rule(
    conn: asyncpg.Connection, rule_id: str, operator: str, webhook_url: str
) -> None:
    """A rule as it is stored, written directly: as an older version may have left it."""
    await conn.execute(
        "INSERT INTO alert_rules (rule_id, name, metric, operator, threshold, for_seconds, "
        "devices, webhook_url, webhook_secret, created_at) "
        "VALUES ($1, $1, 'temperature', $2, 30, 0, '{}', $3, 'secret', now())",
        rule_id,
        operator,
        webhook_url,
    )


@pytest.fixture
async def database(postgres_server_url: str) -> str:
    """An instance database with a device whose newest reading is 35 °C."""
    url = await create_database(postgres_server_url)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, "instance", load_migrations("services.instance.migrations", "service"))
        await conn.execute("SET search_path TO instance")
        await conn.execute(
            "INSERT INTO devices (device_id, name, mqtt_username, created_at, last_seen) "
            "VALUES ('d1', 'greenhouse', 'u1', now(), now())"
        )
        async with conn.transaction():
            now = datetime.now(UTC)
            await store_readings(
                conn, [("d1", now, 35.0, 40.0, 1000.0, 1e5, None, None, None, None, None)], set()
            )
    finally:
        await conn.close()
    return url


async def test_a_rule_that_cannot_be_evaluated_or_delivered_stops_no_other(
    database: str,
) -> None:
    from services.licensing.keys import load_keyring

    customer_id = str(uuid.uuid4())
    keyring = load_keyring(Path(license_keys_dir()))
    received: list[dict[str, Any]] = []

    @get("/jwks")
    async def jwks() -> dict[str, Any]:
        return keyring.jwks()

    @post("/hook", status_code=200)
    async def hook(request: Request[Any, Any, Any]) -> None:
        received.append(json.loads(await request.body()))

    conn = await asyncpg.connect(database, server_settings={"search_path": "instance"})
    try:
        async with serving(Litestar([jwks, hook])) as control:
            # Stored before rules were checked: an operator this version does not know, and
            # a webhook URL that is no URL (its port cannot be parsed).
            await insert_rule(conn, "unknown-operator", "=>", f"{control.base_url}/hook")
            await insert_rule(conn, "not-a-url", ">", "https://[::1")
            await insert_rule(conn, "sound", ">", f"{control.base_url}/hook")
            settings = msgspec.convert(
                {
                    "instance_customer_id": customer_id,
                    "database_url": database,
                    "license_jwt": signed_license_issued(customer_id, plan="professional").jwt,
                    "license_jwks_url": f"{control.base_url}/jwks",
                    "control_plane_url": str(control.base_url),
                    "mqtt_port": free_port(),  # no broker: ingest keeps trying, alerts go on
                    "monitoring_token": "m" * 40,
                    "alert_webhook_allowed_cidrs": "127.0.0.0/8",
                },
                InstanceSettings,
            )
            async with serving(create_instance_app(settings)) as instance:
                await eventually(
                    lambda: asyncio.sleep(0, [r["rule_id"] for r in received]),
                    lambda ids: "sound" in ids,
                    timeout=30,
                    what="the sound rule's webhook delivered",
                )
                refused = await eventually(
                    lambda: conn.fetchval(
                        "SELECT last_error FROM webhook_deliveries WHERE rule_id = 'not-a-url'"
                    ),
                    lambda error: error is not None,
                    what="the delivery to a URL that is not one tried",
                )
                metrics = await instance.get("/metrics", headers=MONITORING)
                ready = await instance.get("/health/ready", headers=MONITORING)
            fired = await conn.fetch("SELECT rule_id FROM alert_history WHERE event = 'firing'")
    finally:
        await conn.close()
    assert {r["rule_id"] for r in fired} == {"not-a-url", "sound"}
    assert refused == "refused: is not a valid URL"
    assert 'iotistic_instance_alert_errors_total{stage="evaluate"}' in metrics.text
    evaluate_errors = next(
        float(line.split()[-1])
        for line in metrics.text.splitlines()
        if line.startswith('iotistic_instance_alert_errors_total{stage="evaluate"}')
    )
    assert evaluate_errors >= 1
    assert ready.status_code == 200, ready.text
    assert ready.json()["alerts"] == {"ok": True}
    # Every task of the instance runs under its supervisor, and none had to be restarted.
    tasks = ready.json()["tasks"]
    assert tasks.pop("ok") is True
    assert set(tasks) == {
        "license",
        "database",
        "ingest",
        "housekeeping",
        "usage reports",
        "alerts",
        "devices",
        "device configs",
        "integrations",
        "quotas",
    }
    assert {t["state"] for t in tasks.values()} == {"running"}
    assert {t["restarts"] for t in tasks.values()} == {0}


async def test_a_webhook_to_an_ipv6_literal_names_its_host_in_brackets() -> None:
    targets = WebhookTargets.from_setting("::1/128,127.0.0.0/8")
    for url, host in (
        ("http://[::1]:8080/hook", "[::1]:8080"),
        ("https://[::1]/hook", "[::1]"),
        ("http://127.0.0.1:8080/", "127.0.0.1:8080"),
    ):
        target = await targets.resolve(url)
        _, header, _ = target.via(target.addresses[0])
        assert header == {"Host": host}
