"""Licensing's HTTP API served for real: the JWKS as the key ring makes it, who sees a license,
and what verification refuses."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from libs.config import ServiceSettings
from libs.runtime.platform import Platform
from services.licensing.app import LICENSING
from services.licensing.issuing import LicenseSigner, build_claims
from services.licensing.keys import load_keyring
from services.licensing.plans import plan
from services.targets import build_app
from support import license_keys_dir, serving


@pytest.fixture(scope="module")
async def client(settings: ServiceSettings, store: object) -> AsyncIterator[httpx.AsyncClient]:
    platform = Platform.from_settings(settings, [LICENSING], license_keys_dir=license_keys_dir())
    async with serving(build_app(platform, "all")) as client:
        await platform.wait_started()
        yield client


async def test_the_jwks_served_is_the_key_rings_in_its_order(client) -> None:
    ring = load_keyring(Path(license_keys_dir()))
    answer = await client.get("/.well-known/jwks.json")
    assert answer.status_code == 200
    assert answer.json() == ring.jwks()
    assert [list(k) for k in answer.json()["keys"]] == [["kty", "n", "e", "kid", "use", "alg"]]


@pytest.mark.parametrize("body", [{}, {"token": ""}, {"token": 5}, {"token": None}])
async def test_verify_without_a_token_names_the_field(client, body) -> None:
    answer = await client.post("/api/licenses/verify", json=body)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["fields"] == [
        {"field": "token", "reason": "is required (the license JWT)"}
    ]


async def test_verify_answers_valid_or_why_not(client) -> None:
    now = datetime.now(UTC)
    claims = build_claims(
        customer_id="c-routes",
        license_id=str(uuid.uuid4()),
        plan=plan("starter"),
        license_type="trial_signup",
        issued_at=now,
        expires_at=now + timedelta(days=14),
        grace_until=None,
        issuer="iotistic-licensing",
    )
    token = LicenseSigner(load_keyring(Path(license_keys_dir()))).sign(claims)
    valid = (await client.post("/api/licenses/verify", json={"token": token})).json()
    assert valid["valid"] is True
    assert valid["claims"]["customerId"] == "c-routes"
    junk = (await client.post("/api/licenses/verify", json={"token": "junk"})).json()
    assert (junk["valid"], junk["reason"]) == (False, "malformed")


async def test_a_license_needs_a_caller_and_is_404_when_there_is_none(client, settings) -> None:
    customer_id = str(uuid.uuid4())
    assert (await client.get(f"/api/licenses/{customer_id}")).status_code == 401
    assert (await client.get(f"/api/licenses/{customer_id}/history")).status_code == 401
    admin = {"Authorization": f"Bearer {settings.admin_token}"}
    assert (await client.get(f"/api/licenses/{customer_id}", headers=admin)).status_code == 404
    history = await client.get(f"/api/licenses/{customer_id}/history", headers=admin)
    assert history.json() == {"customer_id": customer_id, "history": []}
