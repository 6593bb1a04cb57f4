"""The customer instance in the trace that started it: a real instance process exporting its
spans over OTLP/HTTP to a real receiver, started with the TRACEPARENT a deploy gives it. Its
first start is the span ``instance start`` in that trace (service ``iotistic-instance``), and its
calls to the control plane (the JWKS fetch, a relayed sign-in) carry the trace of the instance's
span that made them. The control plane here is the test's own HTTP server, which keeps the
headers of each call (the license's real JWKS, a refused sign-in).

And the local backend's part: the trace is handed to an instance's first run, not to a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar, Request, Response, get, post
from litestar.params import FromPath
from otlp_receiver import ReceivedSpan, Receiver, otlp_receiver

from libs.servers.ports import free_port
from services.provisioner.backends.local.processes import Supervised, keep_running, stop
from support import (
    create_database,
    eventually,
    license_keys_dir,
    serving,
    signed_license_issued,
)

pytestmark = pytest.mark.slow

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
DEPLOY_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{DEPLOY_SPAN}-01"
ROOT = Path(__file__).resolve().parents[2]


class ControlPlane:
    """The calls the instance made to the control plane: (path, traceparent or None)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def app(self) -> Litestar:
        from services.licensing.keys import load_keyring

        keyring = load_keyring(Path(license_keys_dir()))
        calls = self.calls

        @get("/.well-known/jwks.json")
        async def jwks(request: Request[Any, Any, Any]) -> dict[str, Any]:
            calls.append((request.url.path, request.headers.get("traceparent")))
            return keyring.jwks()

        @post("/api/customers/login")
        async def login(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
            calls.append((request.url.path, request.headers.get("traceparent")))
            return Response({"error": {"code": "invalid_credentials"}}, status_code=401)

        @post("/api/instances/{customer:str}/usage", status_code=200)
        async def usage(request: Request[Any, Any, Any], customer: FromPath[str]) -> dict[str, Any]:
            calls.append(("usage", request.headers.get("traceparent")))
            return {}

        return Litestar([jwks, login, usage])

    def traceparents(self, path: str) -> list[str | None]:
        return [parent for called, parent in self.calls if called == path]


@contextlib.asynccontextmanager
async def control_plane() -> AsyncIterator[tuple[ControlPlane, str]]:
    calls = ControlPlane()
    async with serving(calls.app()) as http:
        yield calls, str(http.base_url).rstrip("/")


@contextlib.asynccontextmanager
async def instance_process(
    postgres_server_url: str, control: str, receiver: Receiver, wait: str = "ready", **env: str
) -> AsyncIterator[str]:
    """``python -m services.instance`` for a new customer, exporting to ``receiver``, once it
    is ``wait`` (ready, or live); its URL. Stopped with SIGTERM when the block ends."""
    customer_id = str(uuid.uuid4())
    port = free_port()
    environment = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "INSTANCE_CUSTOMER_ID": customer_id,
        "DATABASE_URL": await create_database(postgres_server_url),
        "LICENSE_JWT": signed_license_issued(customer_id).jwt,
        "LICENSE_JWKS_URL": f"{control}/.well-known/jwks.json",
        "CONTROL_PLANE_URL": control,
        "HTTP_PORT": str(port),
        "OTEL_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        # Exported soon after they end, not every 5 s.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        **env,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.instance", env=environment, cwd=ROOT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            await eventually(
                lambda: _answers(http, f"/health/{wait}"),
                lambda code: code == 200,
                timeout=60,
                what=f"instance {wait}",
            )
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        await process.wait()


async def _answers(http: httpx.AsyncClient, path: str) -> int:
    try:
        return (await http.get(path)).status_code
    except httpx.HTTPError:
        return 0


def span_of(traceparent: str | None) -> tuple[str, str]:
    """The (trace id, span id) a W3C traceparent names."""
    assert traceparent is not None
    _, trace_id, span_id, _ = traceparent.split("-")
    return trace_id, span_id


def named(receiver: Receiver, name: str) -> list[ReceivedSpan]:
    return [s for s in receiver.spans() if s.name == name]


async def test_the_first_start_is_a_span_in_the_trace_the_instance_was_started_in(
    postgres_server_url: str,
) -> None:
    with otlp_receiver() as receiver:
        async with (
            control_plane() as (calls, control),
            instance_process(
                postgres_server_url,
                control,
                receiver,
                TRACEPARENT=TRACEPARENT,
                USAGE_TOKEN="t" * 40,
                USAGE_REPORT_SECONDS="0.5",
            ) as url,
        ):
            [start] = await eventually(
                lambda: asyncio.sleep(0, named(receiver, "instance start")),
                lambda found: len(found) == 1,
                what="instance start exported",
            )
            assert start.trace_id == TRACE_ID
            assert start.parent_span_id == DEPLOY_SPAN
            assert start.service_name == "iotistic-instance"
            assert start.status_code != 2  # not an error: it became ready
            customer_id = start.attributes["iotistic.customer_id"]
            assert start.resource["iotistic.customer_id"] == customer_id

            # Its parts are its children, in its trace; the license's part fetched the keys.
            parts = {s.name: s for s in receiver.trace(TRACE_ID) if s.name.startswith("start ")}
            assert {"start license", "start database"} <= set(parts)
            assert {p.parent_span_id for p in parts.values()} == {start.span_id}
            [jwks_call] = calls.traceparents("/.well-known/jwks.json")
            assert span_of(jwks_call) == (TRACE_ID, parts["start license"].span_id)

            # A sign-in relayed to the control plane carries the instance's request span.
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                answer = await http.post(
                    "/dashboard/login", json={"email": "a@example.com", "password": "wrong one"}
                )
            assert answer.status_code == 401, answer.text
            [relayed] = calls.traceparents("/api/customers/login")
            trace_id, span_id = span_of(relayed)
            assert trace_id != TRACE_ID  # a request of its own, not the deploy's
            request = await eventually(
                lambda: asyncio.sleep(0, [s for s in receiver.spans() if s.span_id == span_id]),
                bool,
                what="the relaying span exported",
            )
            assert request[0].service_name == "iotistic-instance"
            assert request[0].trace_id == trace_id

            # A usage report is a trace of its own, which the control plane's handling joins.
            reported = await eventually(
                lambda: asyncio.sleep(0, calls.traceparents("usage")), bool, what="a usage report"
            )
            [report] = await eventually(
                lambda: asyncio.sleep(0, named(receiver, "report usage")), bool, what="exported"
            )
            assert report.parent_span_id == "" and report.trace_id != TRACE_ID
            assert span_of(reported[0]) == (report.trace_id, report.span_id)


async def test_without_a_traceparent_or_with_a_bad_one_the_start_is_a_trace_of_its_own(
    postgres_server_url: str,
) -> None:
    with otlp_receiver() as receiver:
        async with (
            control_plane() as (calls, control),
            instance_process(
                postgres_server_url, control, receiver, TRACEPARENT="00-not-a-trace-01"
            ),
        ):
            [start] = await eventually(
                lambda: asyncio.sleep(0, named(receiver, "instance start")),
                lambda found: len(found) == 1,
                what="instance start exported",
            )
            assert start.parent_span_id == ""
            assert start.trace_id != TRACE_ID
            [jwks_call] = calls.traceparents("/.well-known/jwks.json")
            assert jwks_call is not None and start.trace_id in jwks_call


async def test_an_instance_stopped_before_it_was_ready_exports_its_start_as_failed(
    postgres_server_url: str,
) -> None:
    with otlp_receiver() as receiver:
        async with control_plane() as (_, control):
            async with instance_process(
                postgres_server_url,
                control,
                receiver,
                wait="live",
                TRACEPARENT=TRACEPARENT,
                # Its license's keys are nowhere: it never becomes ready.
                LICENSE_JWKS_URL=f"{control}/nowhere",
                # Nothing is exported on a timer while it runs: only at exit, flushed.
                OTEL_BSP_SCHEDULE_DELAY="600000",
            ):
                assert named(receiver, "instance start") == []
            [start] = named(receiver, "instance start")
    assert start.trace_id == TRACE_ID
    assert start.status_code == 2  # error
    [license_part] = named(receiver, "start license")
    assert license_part.parent_span_id == start.span_id


async def test_the_local_backend_gives_the_trace_to_the_first_run_only(tmp_path: Path) -> None:
    from libs.observability.telemetry import trace_environment

    seen = tmp_path / "seen"
    supervised = Supervised(
        customer_id="c1",
        port=1,
        command=["sh", "-c", f'echo "${{TRACEPARENT:-none}}" >> {seen}; exit 3'],
        env={"PATH": os.environ["PATH"]},
        log_path=tmp_path / "log",
        trace={"TRACEPARENT": TRACEPARENT},
    )
    assert "TRACEPARENT" not in trace_environment()  # no span here: nothing of the test's
    supervised.task = asyncio.create_task(keep_running(supervised))
    try:
        lines = await eventually(
            lambda: asyncio.sleep(0, seen.read_text().split() if seen.exists() else []),
            lambda lines: len(lines) >= 2,
            what="a first run and a restart",
        )
    finally:
        await stop(supervised)
    assert lines[:2] == [TRACEPARENT, "none"]
