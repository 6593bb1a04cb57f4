"""The upgrade flow on `iotistic up`, as a new user tries it: signup, trial, checkout URL,
Stripe's signed webhooks, a professional license; then `replay billing --verify` is clean.

Stripe's API is the labelled STAND-IN (tests/stripe_standin.py), reached by the real command
through STRIPE_API_BASE; everything else is the command as shipped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
from test_platform import IOTISTIC, wait_status

from libs.embedded import free_port
from stripe_signing import SECRET, sign
from stripe_standin import API_KEY, StripeStandIn
from support import eventually, license_keys_dir, serving

pytestmark = pytest.mark.slow

PRO = "price_pro_up"
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
