"""The device routes (``/api/v1/device/...``, no session) against a stranger on the Internet
and a tenant holding a provisioning key: bodies the shared input checks would refuse on other
routes (JSON nested deeper than the decoder goes, NUL characters). Each is a 4xx naming the field,
audited, never a 500. Everything real: the control plane, the instance, Postgres, NATS and
Mosquitto.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from fleet_steps import create_key, new_api_key, new_uuid, post_registration, registration_body
from test_instance import (  # noqa: F401 - client is a fixture
    Customer,
    client,
    customer,
)

pytestmark = pytest.mark.slow

DEEP = b"[" * 1500 + b"]" * 1500


@pytest.fixture(scope="module")
async def cora(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "cora@example.com")
    yield found
    await found.api.aclose()


def url(c: Customer) -> str:
    return str(c.api.base_url)


async def refused_attempts(c: Customer) -> int:
    audit = (await c.api.get("/api/provisioning-keys/audit")).json()["entries"]
    return len([e for e in audit if e["outcome"] == "refused"])


async def test_bodies_no_route_takes_are_audited_400s_on_the_device_routes(cora) -> None:
    key = (await create_key(cora))["key"]
    uuid = new_uuid()
    body = registration_body(uuid, new_api_key())
    nul = httpx.Request("POST", "/", json={**body, "deviceName": "a\x00b"}).content
    deep = {
        "deep": DEEP,
        "deep in a field": b'{"uuid": "' + uuid.encode() + b'", "x": ' + DEEP + b"}",
    }
    bad = {**deep, "nul": nul}
    json_type = {"Content-Type": "application/json"}
    before = await refused_attempts(cora)
    async with httpx.AsyncClient(base_url=url(cora), timeout=30) as http:
        for what, content in bad.items():
            answer = await http.post(
                "/api/v1/device/register",
                content=content,
                headers={"Authorization": f"Bearer {key}", **json_type},
            )
            assert answer.status_code == 400, (what, answer.text)
            assert answer.json()["error"]["fields"][0]["field"] in ("body", "deviceName", "uuid")
        # A stranger with no key at all, on the key exchange.
        for what, content in deep.items():
            answer = await http.post(
                f"/api/v1/device/{uuid}/key-exchange", content=content, headers=json_type
            )
            assert answer.status_code == 400, (what, answer.text)
    # Every one of them is an attempt of the audit trail (and counts against the address).
    assert await refused_attempts(cora) - before == len(bad) + len(deep)


async def test_many_registrations_at_once_take_a_key_no_further_than_its_max_uses(cora) -> None:
    key = await create_key(cora, max_uses=3)
    answers = await asyncio.gather(
        *(
            post_registration(url(cora), key["key"], registration_body(new_uuid(), new_api_key()))
            for _ in range(16)
        )
    )
    codes = sorted(a.status_code for a in answers)
    assert codes == [200] * 3 + [403] * 13, [a.text for a in answers]
    assert {a.json()["error"]["message"] for a in answers if a.status_code == 403} == {
        "the provisioning key is used up"
    }
    listed = (await cora.api.get("/api/provisioning-keys")).json()["keys"]
    held = next(k for k in listed if k["key_id"] == key["key_id"])
    assert (held["uses"], held["state"], held["devices"]) == (3, "used up", 3)
