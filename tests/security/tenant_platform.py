"""The platform as an attacker meets it: the control plane (target ``all``) on a port of its own,
the local backend's instance of one signed-up customer, the shared Mosquitto, and the Stripe
stand-in (``tests/stripe_standin.py``, a stand-in for Stripe's API, which cannot be reached from
here) so billing's routes answer as they would in production. Used by ``tests/security`` and by
``./dev fuzz``.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from libs.config import ServiceSettings
from libs.runtime.platform import Platform
from services.provisioner.backends.local.backend import instance_name
from services.targets import CONTROL_PLANE, build_app
from tests.stripe_standin import API_KEY, StripeStandIn
from tests.support import eventually, local_backend_settings, serving

PASSWORD = "a long passphrase for attacks"
PRICES = {plan: f"price_{plan}_standin" for plan in ("starter", "professional", "enterprise")}


@dataclass
class Tenant:
    """A signed-up customer with a running instance."""

    customer_id: str
    email: str
    token: str
    instance_url: str
    log_path: Path

    @property
    def auth(self) -> dict[str, str]:
        """The customer's session as a header."""
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class World:
    """What an attack is made against."""

    control: httpx.AsyncClient
    admin_token: str
    tenant: Tenant
    instance: httpx.AsyncClient

    @property
    def admin(self) -> dict[str, str]:
        """The operator's credential as a header."""
        return {"Authorization": f"Bearer {self.admin_token}"}


async def sign_up(control: httpx.AsyncClient, instances: Path, email: str) -> Tenant:
    """A customer signed up, logged in, with an instance that is ready."""
    signed = await control.post(
        "/api/customers/signup",
        json={"email": email, "password": PASSWORD, "company_name": "Mallory Air"},
    )
    assert signed.status_code == 201, signed.text
    customer_id = signed.json()["customer"]["customer_id"]
    login = await control.post("/api/customers/login", json={"email": email, "password": PASSWORD})
    assert login.status_code == 200, login.text
    token = login.json()["token"]
    me = await eventually(
        lambda: control.get("/api/customers/me", headers={"Authorization": f"Bearer {token}"}),
        lambda r: r.json()["deployment"]["status"] == "ready",
        timeout=60,
        what="the customer's instance",
    )
    return Tenant(
        customer_id=customer_id,
        email=email,
        token=token,
        instance_url=me.json()["deployment"]["instance_url"],
        log_path=instances / instance_name(customer_id) / "instance.log",
    )


@contextlib.asynccontextmanager
async def running_world(
    settings: ServiceSettings, broker: Any, port: int, folder: Path
) -> AsyncIterator[World]:
    """The control plane on ``port`` with one customer's instance running, until the end."""
    standin = StripeStandIn(prices=set(PRICES.values()))
    async with serving(standin.app()) as stripe_api:
        platform = Platform.from_settings(
            settings,
            list(CONTROL_PLANE.values()),
            **local_backend_settings(broker, port, folder),
            stripe_secret_key=API_KEY,
            stripe_api_base=str(stripe_api.base_url).rstrip("/"),
            stripe_webhook_secret="whsec_" + secrets.token_hex(16),
            stripe_price_starter=PRICES["starter"],
            stripe_price_professional=PRICES["professional"],
            stripe_price_enterprise=PRICES["enterprise"],
        )
        async with serving(build_app(platform, "all"), port) as control:
            await platform.wait_started()
            tenant = await sign_up(control, folder / "instances", "mallory@example.com")
            async with httpx.AsyncClient(
                base_url=tenant.instance_url, headers=tenant.auth, timeout=30
            ) as instance:
                assert settings.admin_token
                yield World(
                    control=control,
                    admin_token=settings.admin_token,
                    tenant=tenant,
                    instance=instance,
                )
