"""Bad input gets a 400 naming the field and the reason, never a 5xx and never a traceback in the
log: each attack of issue 11 (item 7, and the non-ASCII tokens of item 11) against the real
control plane and a real customer instance, over HTTP. The control plane runs in this process
(its log is pytest's captured log); the instance is a process of the local backend, whose log is
its file.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.servers.mosquitto import EmbeddedMosquitto
from tests.security.tenant_platform import World, running_world

pytestmark = pytest.mark.slow

BAD_UTF8 = b'{"email": "mallory\xff\xfe@example.com", "password": "a long passphrase", "x": "\xc3"}'
DEEP = b"[" * 1000 + b"]" * 1000
DEEP_OBJECT = b'{"a":' * 1000 + b"1" + b"}" * 1000
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
async def world(
    settings: ServiceSettings,
    store: EventStore,
    broker: EmbeddedMosquitto,
    port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[World]:
    async with running_world(settings, broker, port, tmp_path_factory.mktemp("world")) as found:
        yield found


@pytest.fixture(scope="module")
async def device_id(world: World) -> str:
    answer = await world.instance.post("/api/devices", json={"name": "probe"})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["device_id"])


def refused(answer: httpx.Response, field: str | None, status: int = 400) -> dict[str, Any]:
    """The answer is ``status`` in the error shape, naming ``field`` (for a 400) with a reason."""
    assert answer.status_code == status, (answer.status_code, answer.text[:500])
    error = answer.json()["error"]
    assert error["status"] == status
    assert error["code"] and error["message"]
    if field is not None:
        named = {f["field"]: f["reason"] for f in error["fields"]}
        assert field in named, named
        assert named[field]
    return dict(error)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@contextlib.contextmanager
def control_log_clean(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Nothing the control plane logs while the block runs is an error or a traceback."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        yield
    assert "Traceback" not in caplog.text, caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@contextlib.contextmanager
def instance_log_clean(path: Path) -> Iterator[None]:
    """Nothing the instance writes to its log while the block runs is an error or a traceback
    (the instance logs at WARNING; every line is flushed before the answer is sent)."""
    start = path.stat().st_size
    yield
    written = path.read_bytes()[start:].decode(errors="replace")
    assert "Traceback" not in written, written
    assert " ERROR " not in written, written


@pytest.mark.parametrize(
    ("path", "needs"),
    [
        ("/api/customers/signup", None),
        ("/api/customers/login", None),
        ("/api/licenses/verify", None),
        ("/api/billing/checkout", "session"),
    ],
)
async def test_invalid_utf8_bodies_are_400(world: World, caplog, path: str, needs: Any) -> None:
    headers = {**JSON, **(world.tenant.auth if needs else {})}
    with control_log_clean(caplog):
        answer = await world.control.post(path, content=BAD_UTF8, headers=headers)
    refused(answer, "body")


@pytest.mark.parametrize("body", [DEEP, DEEP_OBJECT], ids=["array", "object"])
@pytest.mark.parametrize(
    "path", ["/api/customers/signup", "/api/customers/login", "/api/licenses/verify"]
)
async def test_json_nested_a_thousand_deep_is_400(world: World, caplog, path, body) -> None:
    with control_log_clean(caplog):
        answer = await world.control.post(path, content=body, headers=JSON)
    assert "nested" in refused(answer, "body")["fields"][0]["reason"]


@pytest.mark.parametrize(
    ("path", "admin"),
    [
        ("/api/licenses/%00", True),
        ("/api/licenses/%00/history", True),
        ("/api/queue/jobs/%00", True),
        ("/api/queue/customer/%00/jobs", True),
        ("/api/customers/%00/deployment/status", True),
    ],
)
async def test_control_characters_in_a_path_are_400(world: World, caplog, path, admin) -> None:
    headers = world.admin if admin else world.tenant.auth
    with control_log_clean(caplog):
        answer = await world.control.get(path, headers=headers)
    assert "control characters" in refused(answer, "path")["fields"][0]["reason"]


async def test_a_nul_in_a_body_string_is_400(world: World, caplog) -> None:
    # Postgres cannot store a NUL and no field of ours needs one: refused wherever it is.
    with control_log_clean(caplog):
        answer = await world.control.post(
            "/api/customers/signup",
            json={
                "email": "nul@example.com",
                "password": "a long pass\x00phrase",
                "company_name": "Nul Air",
            },
        )
    refused(answer, "password")


@pytest.mark.parametrize("grace", [1e30, 10**30, 1e300])
async def test_an_absurd_grace_in_queue_clean_is_400(world: World, caplog, grace) -> None:
    with control_log_clean(caplog):
        answer = await world.control.post(
            "/api/queue/clean",
            json={"state": "completed", "grace_seconds": grace},
            headers=world.admin,
        )
    refused(answer, "grace_seconds")


@pytest.mark.parametrize("seq", ["9" * 30, str(2**63)])
async def test_a_parked_seq_beyond_bigint_is_400(world: World, caplog, seq: str) -> None:
    with control_log_clean(caplog):
        answer = await world.control.post(
            f"/api/admin/projections/signup/accounts/parked/{seq}/skip", headers=world.admin
        )
    refused(answer, "seq")


async def test_a_non_ascii_usage_token_is_401(world: World, caplog) -> None:
    with control_log_clean(caplog):
        answer = await world.control.post(
            f"/api/instances/{world.tenant.customer_id}/usage",
            content=b"{}",
            headers={**JSON, "Authorization": "Bearer ünïcødé".encode()},
        )
    refused(answer, None, status=401)


async def test_a_non_ascii_admin_page_form_token_is_403(world: World, caplog) -> None:
    with control_log_clean(caplog):
        answer = await world.control.post(
            "/admin/queues/clean",
            content="csrf=%C3%BC%C3%B1&state=failed",
            headers={
                "content-type": "application/x-www-form-urlencoded",
                "Authorization": basic("ops", world.admin_token),
            },
        )
    refused(answer, None, status=403)


# --- the customer instance -------------------------------------------------------------------


async def test_a_nul_in_a_device_path_is_400(world: World) -> None:
    with instance_log_clean(world.tenant.log_path):
        for path in ("/api/devices/%00", "/api/devices/%00/readings", "/api/devices/x%0a"):
            answer = await world.instance.get(path)
            refused(answer, "path")


@pytest.mark.parametrize(
    ("name", "field"),
    [("pro\x00be", "name"), ("line\nbreak", "name"), ("bell\x07", "name")],
)
async def test_a_control_character_in_a_device_name_is_400(world: World, name, field) -> None:
    with instance_log_clean(world.tenant.log_path):
        answer = await world.instance.post("/api/devices", json={"name": name})
    refused(answer, field)


async def test_a_non_ascii_bearer_token_on_the_instance_is_401(world: World) -> None:
    with instance_log_clean(world.tenant.log_path):
        answer = await world.instance.get(
            "/api/devices", headers={"Authorization": "Bearer ünïcødé".encode()}
        )
    refused(answer, None, status=401)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"to": "0001-01-01T00:00:00"}, "to"),
        ({"to": "9999-12-31T23:59:59.999999-14:00"}, "to"),
        ({"from": "0001-01-01T00:00:00+14:00", "to": "0001-01-02T00:00:00"}, "to"),
        ({"metrics": ",".join(["temperature"] * 1000)}, "metrics"),
    ],
)
async def test_readings_out_of_range_are_400(world: World, device_id, query, field) -> None:
    with instance_log_clean(world.tenant.log_path):
        answer = await world.instance.get(f"/api/devices/{device_id}/readings", params=query)
    refused(answer, field)


async def test_a_repeated_metrics_parameter_is_400(world: World, device_id: str) -> None:
    with instance_log_clean(world.tenant.log_path):
        answer = await world.instance.get(
            f"/api/devices/{device_id}/readings",
            params=[("metrics", "temperature")] * 1000,
        )
    assert "more than once" in refused(answer, "metrics")["fields"][0]["reason"]


@pytest.mark.parametrize("to", ["9999-12-31T23:59:59.999999-14:00", "0001-01-01T00:00:00"])
async def test_the_csv_with_an_extreme_to_is_whole_or_refused(world, device_id, to) -> None:
    with instance_log_clean(world.tenant.log_path):
        async with world.instance.stream(
            "GET", f"/api/devices/{device_id}/readings.csv", params={"to": to}
        ) as answer:
            body = await answer.aread()  # a body cut mid-way raises here
    if answer.status_code == 200:
        rows = list(csv.reader(io.StringIO(body.decode())))
        assert rows[0][0] == "ts"
    else:
        refused(answer, "to")


async def test_a_threshold_beyond_a_float_is_400(world: World) -> None:
    with instance_log_clean(world.tenant.log_path):
        answer = await world.instance.post(
            "/api/alerts/rules",
            content=b'{"metric": "temperature", "operator": ">", "threshold": 1%s}' % (b"0" * 400),
            headers=JSON,
        )
    refused(answer, "threshold")
