"""One trace from a request through the events it causes, across services."""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import pytest
from litestar.testing import AsyncTestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from span_links import recorded_spans

from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.observability.telemetry import tracer
from libs.runtime.platform import Platform
from services.billing.app import BILLING
from services.licensing.app import LICENSING
from services.signup.app import SIGNUP
from services.targets import build_app
from support import eventually, license_issued, license_keys_dir, make_platform, serving


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span finished in this process while the module runs, in memory."""
    with recorded_spans() as exporter:
        yield exporter


async def test_an_event_is_handled_in_the_trace_of_the_request_that_caused_it(
    spans: InMemorySpanExporter, settings: ServiceSettings, store: EventStore
) -> None:
    platform = make_platform(settings, [SIGNUP, LICENSING])
    await platform.start()
    await platform.wait_started()
    try:
        event = license_issued()
        with tracer("test").start_as_current_span("POST /api/customers/signup") as request:
            await store.publish(event, customer_id=event.customer_id)
        request_ctx = request.get_span_context()

        def handled() -> list[object]:
            return [
                s
                for s in spans.get_finished_spans()
                if s.name == "apply LicenseIssued"
                and s.context is not None
                and s.context.trace_id == request_ctx.trace_id
            ]

        # Each service applies it twice. Signup: to the account view and to the customer's last
        # events; licensing: to its licenses and in the reactor that tracks the current one.
        found = await eventually(
            lambda: _now(handled()), lambda found: len(found) == 4, what="both services' spans"
        )
        services = sorted(s.attributes["iotistic.service"] for s in found)  # type: ignore[attr-defined]
        assert services == ["licensing", "licensing", "signup", "signup"]
        for span in found:
            assert span.parent is not None  # type: ignore[attr-defined]
            assert span.parent.span_id == request_ctx.span_id  # type: ignore[attr-defined]
        conn = await asyncpg.connect(settings.database_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM licensing.licenses") == 1
        finally:
            await conn.close()
    finally:
        await platform.stop()


async def test_a_request_continues_the_callers_trace(
    spans: InMemorySpanExporter, settings: ServiceSettings
) -> None:
    platform = make_platform(settings, [LICENSING])
    app = build_app(platform, "licensing")
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with AsyncTestClient(app) as client:
        response = await client.get(
            "/schema/openapi.json",
            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        )
        assert response.status_code == 200
    server_spans = [
        s
        for s in spans.get_finished_spans()
        if s.context is not None and f"{s.context.trace_id:032x}" == trace_id
    ]
    assert server_spans, "the request made no span in the caller's trace"
    assert any(s.name.startswith("GET /schema/openapi.json") for s in server_spans), [
        s.name for s in server_spans
    ]


async def _now(value: list[object]) -> list[object]:
    return value


async def test_a_signup_request_and_every_event_it_causes_are_one_trace(
    spans: InMemorySpanExporter, settings: ServiceSettings, store: EventStore
) -> None:
    platform = Platform.from_settings(
        settings,
        [SIGNUP, LICENSING, BILLING],
        license_keys_dir=license_keys_dir(),
        argon2_memory_kib=8192,
        argon2_time_cost=1,
    )
    async with serving(build_app(platform, "all")) as client:
        await platform.wait_started()
        response = await client.post(
            "/api/customers/signup",
            json={
                "email": "trace@example.com",
                "password": "a long passphrase",
                "company_name": "Traced Air",
            },
        )
        assert response.status_code == 201
        assert response.json()["license"]["status"] == "active"
    [request] = [
        s
        for s in spans.get_finished_spans()
        if s.name.startswith("POST /api/customers/signup") and s.kind.name == "SERVER"
    ]
    trace_id = request.context.trace_id
    in_trace = {
        (s.attributes.get("iotistic.service"), s.name)
        for s in spans.get_finished_spans()
        if s.context.trace_id == trace_id and s.name.startswith("apply ")
    }
    # One process serves every service, yet each span is its own service's.
    assert request.resource.attributes["service.name"] == "iotistic-signup"
    names = {
        (s.attributes.get("iotistic.service"), s.resource.attributes["service.name"])
        for s in spans.get_finished_spans()
        if s.context.trace_id == trace_id
    }
    assert {("signup", "iotistic-signup"), ("licensing", "iotistic-licensing")} <= names
    assert ("billing", "iotistic-billing") in names
    assert all(name == f"iotistic-{service}" for service, name in names), [
        (s.name, s.kind, s.attributes)
        for s in spans.get_finished_spans()
        if s.context.trace_id == trace_id and "iotistic.service" not in s.attributes
    ]
    # signup's request → licensing and billing answer → signup's account view applies both.
    assert ("licensing", "apply CustomerSignedUp") in in_trace
    assert ("billing", "apply CustomerSignedUp") in in_trace
    assert ("signup", "apply LicenseIssued") in in_trace
    assert ("signup", "apply TrialStarted") in in_trace


@pytest.mark.parametrize(("members", "kept"), [(2, True), (30, False)])
def test_a_callers_oversized_tracestate_is_not_copied_into_events(members: int, kept: bool) -> None:
    from opentelemetry import context as otel_context

    from libs.observability.telemetry import (
        TRACESTATE_MAX_CHARS,
        context_from,
        current_trace_context,
    )

    tracestate = ",".join(f"vendor{i}={'x' * 40}" for i in range(members))
    assert (len(tracestate) <= TRACESTATE_MAX_CHARS) is kept
    token = otel_context.attach(
        context_from(
            {
                "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "tracestate": tracestate,
            }
        )
    )
    try:
        carried = current_trace_context()
    finally:
        otel_context.detach(token)
    assert carried["traceparent"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    assert ("tracestate" in carried) is kept


async def test_a_requests_query_string_stays_out_of_its_span(
    spans: InMemorySpanExporter, settings: ServiceSettings
) -> None:
    """Links carry tokens in their query (an email verification, a password reset) and
    searches carry emails; spans leave the process for a collector."""
    platform = make_platform(settings, [LICENSING])
    app = build_app(platform, "licensing")
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4736"
    async with AsyncTestClient(app) as client:
        response = await client.get(
            "/schema/openapi.json?token=s3cret-link-token&q=ada%40example.com",
            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        )
        assert response.status_code == 200
    [server] = [
        s
        for s in spans.get_finished_spans()
        if f"{s.context.trace_id:032x}" == trace_id and s.kind.name == "SERVER"
    ]
    shown = repr(dict(server.attributes or {})) + server.name
    assert "/schema/openapi.json" in shown
    assert "s3cret" not in shown and "example.com" not in shown, shown
