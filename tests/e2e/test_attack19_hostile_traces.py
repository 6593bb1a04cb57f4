"""A tenant attacks the tracing: what the control plane makes of the trace headers any client
may send, and what of a customer's secrets reaches a collector.

The platform runs as ``iotistic run --target all`` on the local backend, exporting to a real
OTLP receiver. Requests carry malformed, oversized, repeated and borrowed ``traceparent`` and
``tracestate`` headers: none is answered 500, none copies a large ``tracestate`` into a job's
cause. Then a customer signs up, signs in, follows one-time links and reaches their instance:
no span exported, the instance's included, holds their email, password, session token, a
one-time link's token, a JWT or the platform's admin token. Nor can a client's ``traceparent``
saying "not sampled" leave its journey out of the traces.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from journey_steps import (
    JOB_SPAN,
    SIGNUP_SPAN,
    platform_environment,
    running_platform,
    sign_up_until_healthy,
    signup_trace,
)
from otlp_receiver import ReceivedSpan, otlp_receiver

from libs.servers.mosquitto import EmbeddedMosquitto
from libs.servers.ports import free_port
from support import create_database, eventually, license_keys_dir, nats_credentials_dir

pytestmark = pytest.mark.slow

# 30 members of 250 characters: a tracestate OpenTelemetry accepts (at most 8192), 15 times
# the 512 of W3C that events keep.
LARGE_TRACESTATE = ",".join(f"k{i}={'v' * 250}" for i in range(30))
PASSWORD = "attack19 horse battery staple"
ONE_TIME_TOKEN = "attack19-one-time-" + uuid.uuid4().hex


def hostile_headers(borrowed_trace: str) -> Iterator[list[tuple[str, str]]]:
    """Trace headers a client may send with any request."""
    yield [("traceparent", "00-not-a-trace-01")]
    yield [("traceparent", "ff-" + "f" * 32 + "-" + "f" * 16 + "-ff")]
    yield [("traceparent", "00-" + "0" * 32 + "-" + "0" * 16 + "-01")]
    yield [("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01\x7f")]
    yield [("traceparent", f"00-{'1' * 32}-{'2' * 16}-01")] * 200
    yield [("traceparent", f"00-{borrowed_trace}-{'3' * 16}-01"), ("tracestate", LARGE_TRACESTATE)]
    yield [("tracestate", "=" * 12000), ("traceparent", f"00-{'4' * 32}-{'5' * 16}-01")]
    yield [("traceparent", "00-" + "9" * 1_000_000)]


async def _answer(client: httpx.AsyncClient, headers: list[tuple[str, str]]) -> int:
    email = f"attack19-{uuid.uuid4().hex}@example.com"
    body = {"email": email, "password": PASSWORD, "company_name": "Hostile Trace"}
    try:
        return (await client.post("/api/customers/signup", json=body, headers=headers)).status_code
    except httpx.TransportError:
        return 0  # the server closed a request it would not read: no answer, no failure


async def _get(client: httpx.AsyncClient, headers: list[tuple[str, str]]) -> int:
    try:
        return (await client.get("/api/devices", headers=headers)).status_code
    except httpx.TransportError:
        return 0


async def test_hostile_trace_headers_and_secrets_in_spans(
    postgres_server_url: str, nats_url: str, broker: EmbeddedMosquitto, tmp_path: Path
) -> None:
    database_url = await create_database(postgres_server_url)
    with otlp_receiver() as receiver:
        env = platform_environment(
            database_url=database_url,
            nats_url=nats_url,
            broker=broker,
            folder=tmp_path,
            port=free_port(),
            license_keys=license_keys_dir(),
            credentials_dir=nats_credentials_dir(),
            otlp_endpoint=receiver.endpoint,
        )
        async with running_platform(env) as client:
            journey = await sign_up_until_healthy(client)
            borrowed = signup_trace(receiver.spans())  # another customer's trace
            answers = [await _answer(client, headers) for headers in hostile_headers(borrowed)]
            assert 500 not in answers, answers
            async with httpx.AsyncClient(base_url=journey.instance_url, timeout=10) as instance:
                answered = [await _get(instance, h) for h in hostile_headers(borrowed)]
            # Refused for want of a token (or, too large, by the HTTP server), never failed.
            assert set(answered) <= {0, 400, 401}, answered
            assert answers.count(201) >= 6, answers
            assert (await client.get("/health/ready")).status_code == 200

            secrets = await _use_secrets(client, env["ADMIN_TOKEN"], journey.instance_url)
            await eventually(
                lambda: asyncio.sleep(0, _names(receiver.spans())),
                lambda names: {"GET /verify", "GET /reset"} <= names,
                what="the one-time links' spans exported",
            )
        spans = receiver.spans()
    leaks = [(s.name, s.service_name, found) for s in spans for found in _secrets_in(s, secrets)]
    assert leaks == []
    assert "iotistic-instance" in {s.service_name for s in spans}

    # A job's cause keeps the trace it continues, never a client's outsized tracestate.
    connection = await asyncpg.connect(database_url)
    try:
        causes = await connection.fetch(
            "SELECT cause::text AS cause FROM provisioner.queue_jobs WHERE cause IS NOT NULL"
        )
    finally:
        await connection.close()
    assert len(causes) >= 6
    assert max(len(row["cause"]) for row in causes) < 2048


async def _use_secrets(client: httpx.AsyncClient, admin_token: str, instance: str) -> list[str]:
    """A customer signs in and uses their token, follows one-time links, reaches their
    instance; an operator uses the admin token. The secrets that went by."""
    email = f"attack19-{uuid.uuid4().hex}@example.com"
    body = {"email": email, "password": PASSWORD, "company_name": "Secretive"}
    assert (await client.post("/api/customers/signup", json=body)).status_code == 201
    login = await client.post("/api/customers/login", json={"email": email, "password": PASSWORD})
    token = login.json()["token"]
    me = await client.get("/api/customers/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200
    for path in ("/verify", "/reset"):
        answer = await client.get(path, params={"token": ONE_TIME_TOKEN, "email": email})
        assert answer.status_code < 500
    admin = {"Authorization": f"Bearer {admin_token}"}
    assert (await client.get("/api/queue/stats", headers=admin)).status_code == 200
    async with httpx.AsyncClient(base_url=instance, timeout=10) as http:
        # Whatever the relay answers (this customer is not the instance's), it was traced.
        await http.post("/dashboard/login", json={"email": email, "password": PASSWORD})
        await http.get("/api/devices", params={"token": ONE_TIME_TOKEN})
    return [email, PASSWORD, token, ONE_TIME_TOKEN, admin_token, "eyJ", "@example.com"]


def _names(spans: list[ReceivedSpan]) -> set[str]:
    return {s.name for s in spans}


def _secrets_in(span: ReceivedSpan, secrets: list[str]) -> list[str]:
    text = " ".join([span.name, *_strings(span.attributes), *_strings(span.resource)])
    return [secret for secret in secrets if secret in text]


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [text for item in value.values() for text in _strings(item)]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return [str(value)]


async def test_a_client_cannot_switch_off_the_trace_of_the_journey_it_starts(
    postgres_server_url: str, nats_url: str, broker: EmbeddedMosquitto, tmp_path: Path
) -> None:
    trace_id = uuid.uuid4().hex
    # Flags 00: "not sampled", which a client may say of any request it sends.
    unsampled = {"traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-00"}
    with otlp_receiver() as receiver:
        env = platform_environment(
            database_url=await create_database(postgres_server_url),
            nats_url=nats_url,
            broker=broker,
            folder=tmp_path,
            port=free_port(),
            license_keys=license_keys_dir(),
            credentials_dir=nats_credentials_dir(),
            otlp_endpoint=receiver.endpoint,
        )
        async with running_platform(env) as client:
            email = f"attack19-{uuid.uuid4().hex}@example.com"
            body = {"email": email, "password": PASSWORD, "company_name": "Unsampled"}
            signed = await client.post("/api/customers/signup", json=body, headers=unsampled)
            assert signed.status_code == 201
            names = await eventually(
                lambda: asyncio.sleep(0, _names(receiver.trace(trace_id))),
                lambda names: {JOB_SPAN, "instance start"} <= names,
                timeout=90,
                what="the journey's spans exported (have: last)",
            )
    assert {SIGNUP_SPAN, "apply CustomerSignedUp", "apply LicenseIssued"} <= names
