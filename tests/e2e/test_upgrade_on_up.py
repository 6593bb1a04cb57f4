"""The upgrade flow on `iotistic up`, as a new user tries it: signup, trial, an instance of
their own, checkout URL, Stripe's signed webhooks, a professional license that reaches the
instance, the instance removed; then `replay billing --verify` is clean.

Stripe's API is the labelled STAND-IN (tests/stripe_standin.py), reached by the real command
through STRIPE_API_BASE; everything else is the command as shipped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import asyncpg
import httpx
import pytest
from test_platform import IOTISTIC, wait_status

from libs.servers.ports import free_port
from services.provisioner.backends.local.backend import instance_name
from stripe_signing import SECRET, sign
from stripe_standin import API_KEY, StripeStandIn
from support import eventually, license_keys_dir, serving

pytestmark = pytest.mark.slow

PRO = "price_pro_up"


async def instance_license(url: str, auth: dict[str, str]) -> dict:
    """The license the instance at ``url`` runs under, as its customer (``auth``) sees it; {}
    when nothing answers."""
    try:
        async with httpx.AsyncClient(timeout=2, headers=auth) as client:
            return (await client.get(f"{url}/api/license")).json()
    except httpx.TransportError:
        return {}


ACCOUNT = {
    "email": "Newcomer@Example.com",
    "password": "a long passphrase",
    "company_name": "New Air",
}


async def test_upgrade_flow_end_to_end_on_iotistic_up(tmp_path: Path) -> None:
    standin = StripeStandIn(prices={PRO})
    async with serving(standin.app()) as stripe_http:
        port = free_port()
        data_dir = tmp_path / "data"
        # A 2048-bit test key saves the 4096-bit first-start generation; `up` uses what it finds.
        shutil.copytree(license_keys_dir(), data_dir / "keys" / "licensing")
        env = {
            **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "NATS_URL")},
            "LOG_LEVEL": "WARNING",
            "STRIPE_SECRET_KEY": API_KEY,
            "STRIPE_API_BASE": str(stripe_http.base_url),
            "STRIPE_WEBHOOK_SECRET": SECRET,
            "STRIPE_PRICE_PROFESSIONAL": PRO,
        }
        proc = subprocess.Popen(
            [IOTISTIC, "--data-dir", str(data_dir), "up", "--port", str(port)], env=env
        )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as api:
                await wait_status(api, 200, timeout=120)
                signed = await api.post("/api/customers/signup", json=ACCOUNT)
                assert signed.status_code == 201, signed.text
                assert signed.json()["subscription"]["status"] == "trialing"
                login = await api.post(
                    "/api/customers/login",
                    json={"email": ACCOUNT["email"], "password": ACCOUNT["password"]},
                )
                auth = {"Authorization": f"Bearer {login.json()['token']}"}

                checkout = await eventually(
                    lambda: api.post(
                        "/api/billing/checkout", json={"plan": "professional"}, headers=auth
                    ),
                    lambda r: r.status_code == 201,
                    what="a checkout URL",
                )
                assert checkout.json()["checkout_url"].startswith("https://checkout.stripe.com/")
                for event in standin.complete_checkout(checkout.json()["session_id"]):
                    payload = json.dumps(event).encode()
                    posted = await api.post(
                        "/webhooks/stripe",
                        content=payload,
                        headers={"Stripe-Signature": sign(payload)},
                    )
                    assert posted.status_code == 200, posted.text

                me = await eventually(
                    lambda: api.get("/api/customers/me", headers=auth),
                    lambda r: r.json()["license"]["plan"] == "professional",
                    what="a professional license in /api/customers/me",
                )
                assert me.json()["subscription"]["status"] == "active"
                assert me.json()["license"]["features"]["webhooks"] is True

                # The instance came up at signup and now runs the professional license.
                me = await eventually(
                    lambda: api.get("/api/customers/me", headers=auth),
                    lambda r: r.json()["deployment"]["status"] == "ready",
                    what="the instance deployed and updated",
                )
                url = me.json()["deployment"]["instance_url"]
                held = await eventually(
                    lambda: instance_license(url, auth),
                    lambda held: held.get("plan") == "professional",
                    what="the instance running the professional license",
                )
                assert held["customer_id"] == signed.json()["customer"]["customer_id"]

                # A device registered on the instance publishes with mosquitto_pub, using its
                # own credentials, and the API returns the reading.
                async with httpx.AsyncClient(base_url=url, headers=auth, timeout=10) as instance:
                    device = await instance.post("/api/devices", json={"name": "lab"})
                    assert device.status_code == 201, device.text
                    mqtt = device.json()["mqtt"]
                    published = subprocess.run(
                        [
                            "mosquitto_pub",
                            "-h",
                            mqtt["host"],
                            "-p",
                            str(mqtt["port"]),
                            "-u",
                            mqtt["username"],
                            "-P",
                            mqtt["password"],
                            "-i",
                            mqtt["client_id"],
                            "-q",
                            "1",
                            "-t",
                            mqtt["topics"]["readings"],
                            "-m",
                            json.dumps(
                                {
                                    "ts": int(time.time() * 1000),
                                    "temperature": 22.75,
                                    "humidity": 40.0,
                                    "pressure": 1001.0,
                                    "gas_resistance": 90000.0,
                                    "iaq": 55,
                                }
                            ),
                        ],
                        capture_output=True,
                        text=True,
                        timeout=30,
                    )
                    assert published.returncode == 0, published.stderr
                    stored = await eventually(
                        lambda: instance.get(f"/api/devices/{device.json()['device_id']}"),
                        lambda r: r.json()["latest"] is not None,
                        what="the published reading in the API",
                    )
                    assert stored.json()["latest"]["temperature"] == 22.75

                # The operator removes it: the process stops and its database is dropped.
                customer_id = signed.json()["customer"]["customer_id"]
                token = (data_dir / "secrets" / "admin-token").read_text().strip()
                admin = {"Authorization": f"Bearer {token}"}
                removal = await api.delete(
                    f"/api/customers/{customer_id}/deployment", headers=admin
                )
                assert removal.status_code == 202, removal.text
                await eventually(
                    lambda: api.get(f"/api/queue/jobs/{removal.json()['id']}", headers=admin),
                    lambda r: r.json()["state"] == "completed",
                    what="the delete job completed",
                )
                assert await instance_license(url, auth) == {}
                runtime = json.loads((data_dir / "runtime.json").read_text())
                conn = await asyncpg.connect(runtime["DATABASE_URL"])
                try:
                    left = await conn.fetchval(
                        "SELECT count(*) FROM pg_database WHERE datname = $1",
                        instance_name(customer_id),
                    )
                finally:
                    await conn.close()
                assert left == 0

            verify = subprocess.run(
                [IOTISTIC, "--data-dir", str(data_dir), "replay", "billing", "--verify"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert verify.returncode == 0, verify.stdout + verify.stderr
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 0
