"""What a customer's instance shows to someone without a session: nothing of the customer.

Issue 11: ``/api/license``, ``/health/ready`` and ``/metrics`` of an instance answered anyone
with the customer id (which named the broker session to take over) and the day's usage. Now
``/api/license`` needs the customer's session, ``/health/ready`` tells strangers only its
status and which checks failed, and ``/metrics`` needs the monitoring token the provisioner
derives for the instance, or the customer's session. Real instances, real HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest
from tenant_instances import Tenant, device_client, reading, register, sign_up

from libs.servers.mosquitto import EmbeddedMosquitto
from libs.servers.ports import free_port
from services.instance.app import create_instance_app
from services.instance.settings import InstanceSettings
from services.provisioner.backends.base import derive_password
from support import eventually, serving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def erin(client: httpx.AsyncClient, broker: EmbeddedMosquitto) -> AsyncIterator[Tenant]:
    tenant = await sign_up(client, "erin@example.com")
    # Some usage to give away: a device and a stored reading.
    device = await register(tenant, "porch")
    async with device_client(broker, device) as mqtt:
        await mqtt.publish(device["mqtt"]["topics"]["readings"], reading(), qos=1)
    await eventually(
        lambda: tenant.api.get(f"/api/devices/{device['device_id']}"),
        lambda r: r.json()["latest"] is not None,
        what="a stored reading",
    )
    yield tenant
    await tenant.api.aclose()


def monitoring(tenant: Tenant) -> dict[str, str]:
    """The token the provisioner derives for the tenant's instance (the tests' secret)."""
    return {"Authorization": f"Bearer {derive_password(b'p' * 40, 'monitoring', tenant.id)}"}


async def test_without_a_session_an_instance_shows_no_customer_id_nor_usage(erin) -> None:
    async with httpx.AsyncClient(base_url=erin.url, timeout=10) as stranger:
        answers = {
            path: await stranger.get(path)
            for path in ("/api/license", "/health/ready", "/health", "/metrics", "/", "/schema")
        }
        answers["/schema/openapi.json"] = await stranger.get("/schema/openapi.json")
        wrong = await stranger.get("/metrics", headers={"Authorization": "Bearer " + "x" * 43})
    for path, answer in answers.items():
        assert erin.id not in answer.text, f"{path} shows the customer id"
        assert "iotistic_instance_" not in answer.text, f"{path} shows usage"
    assert answers["/api/license"].status_code == 401
    assert answers["/metrics"].status_code == 401
    assert wrong.status_code == 401 and "iotistic_instance_" not in wrong.text
    assert answers["/health/ready"].status_code == 200
    assert answers["/health/ready"].json() == {"status": "ready"}
    assert answers["/health"].json() == {"status": "ready"}
    assert answers["/"].status_code == 200  # the dashboard page itself stays public


async def test_monitoring_and_the_customer_still_see_theirs(erin) -> None:
    async with httpx.AsyncClient(base_url=erin.url, timeout=10) as http:
        ready = await http.get("/health/ready", headers=monitoring(erin))
        metrics = await http.get("/metrics", headers=monitoring(erin))
        live = await http.get("/health/live")
    assert ready.json()["customer_id"] == erin.id
    assert ready.json()["license"]["license_id"]
    assert metrics.status_code == 200 and "iotistic_instance_readings_stored_total" in metrics.text
    assert live.json() == {"status": "live"}
    own = await erin.api.get("/api/license")
    assert own.status_code == 200 and own.json()["customer_id"] == erin.id
    assert (await erin.api.get("/metrics")).status_code == 200


async def test_a_failing_instance_tells_strangers_only_which_checks_failed(
    database_url: str, tmp_path: Path
) -> None:
    """An instance whose license cannot be verified (no JWKS answers) is not ready; a
    stranger learns that and the name of the failed check, nothing else."""
    customer_id = "0d5c1f0e-5b8a-4f7e-9c1d-6f2b3a4c5d6e"
    license_file = tmp_path / "license.jwt"
    license_file.write_text("not.a.license")
    settings = msgspec.convert(
        {
            "instance_customer_id": customer_id,
            "database_url": database_url,
            "license_file": str(license_file),
            "license_jwks_url": f"http://127.0.0.1:{free_port()}/.well-known/jwks.json",
            "control_plane_url": f"http://127.0.0.1:{free_port()}",
            "mqtt_port": free_port(),  # no broker there: ingest keeps trying, the rest answers
            "monitoring_token": "m" * 40,
        },
        InstanceSettings,
    )
    token = {"Authorization": "Bearer " + "m" * 40}
    async with serving(create_instance_app(settings)) as http:
        detailed = await eventually(
            lambda: http.get("/health/ready", headers=token),
            lambda r: r.json().get("database", {}).get("ok") is True,
            what="the instance's database connected",
        )
        answer = await http.get("/health/ready")
    assert detailed.status_code == 503
    assert answer.status_code == 503
    assert customer_id not in answer.text
    assert answer.json() == {"status": "not_ready", "failed": ["license"]}
    assert detailed.json()["customer_id"] == customer_id
    assert detailed.json()["license"]["ok"] is False
