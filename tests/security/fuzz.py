"""`./dev fuzz`: schemathesis against every operation of the control plane and of a customer's
instance, over HTTP, counting the answers of 500 or more (there must be none).

The platform is started here as ``tests/security/tenant_platform.py`` starts it (embedded
Postgres and NATS, a Mosquitto of its own, the Stripe stand-in, the local backend, one
signed-up customer with a running instance), on free ports and in a temporary folder. Each
operation gets ``--examples`` cases that fit its OpenAPI description and as many that do not
(schemathesis's positive and negative modes), GET operations as many again with the
customer's real ids, and every declared parameter each of ``HOSTILE_VALUES``, within
``--seconds`` per API. Admin routes get the admin token, the
customer's routes the customer's session. Left out: ``GET /api/stream`` and
``/api/quotas/stream`` (server-sent events, an answer that never ends) and the instances' usage
reports and quota notices (their token is the instance's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, Verbosity, given
from schemathesis import GenerationMode

SKIPPED = (
    "/api/stream",
    "/api/quotas/stream",
    "/api/instances/{customer_id}/usage",
    "/api/instances/{customer_id}/quota-notices",
)
# Values random generation seldom draws, each of which once made an operation answer 500 (issue
# 11): control characters, numbers past 64 bits, the calendar's edges, one thing a thousand
# times. Every declared parameter gets each of them, once, after the random cases.
HOSTILE_VALUES = (
    "\x00",
    "a\x00\n2026-12-01 00:00:00,000 CRITICAL forged.logger: x",
    "\x1b[2J\x7f\u2028",
    "\u00fc\u00f1\u00ef\u00e7\u00f8d\u00e9",
    "9" * 30,
    str(2**63),
    "-9223372036854775809",
    "1e30",
    "0001-01-01T00:00:00",
    "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59.999999-14:00",
    ",".join(["temperature"] * 1000),
)
HOSTILE_HEADERS = ("\u00fc\u00f1\u00ef\u00e7\u00f8d\u00e9", "x" * 1000)
HOSTILE_JSON: tuple[Any, ...] = (
    "a\x00b",
    10**30,
    -(10**30),
    1e300,
    "0001-01-01T00:00:00",
    ["x"] * 1000,
)
ADMIN_PATHS = re.compile(
    r"^/(api/queue(?!/customer/)|api/admin/|admin/|api/customers/\{[^}]+\}/deploy)"
)


@dataclass
class FuzzReport:
    """What one API answered to the fuzzer."""

    api: str
    operations: int = 0
    cases: int = 0
    seconds: float = 0.0
    server_errors: list[str] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for the console and the README."""
        return (
            f"{self.api}: {self.operations} operations, {self.cases} cases in "
            f"{self.seconds:.0f} s; responses >= 500: {len(self.server_errors)}; "
            f"no answer: {len(self.transport_errors)}"
        )


def fuzz_api(
    base_url: str,
    credential: Callable[[str], dict[str, str]],
    *,
    examples: int,
    seconds: float,
    known: dict[str, str] | None = None,
    name: str = "api",
) -> FuzzReport:
    """Run schemathesis's cases against every operation of the OpenAPI document at
    ``base_url``; ``credential(path)`` gives the headers an operation is called with."""
    schema = schemathesis.openapi.from_url(f"{base_url}/schema/openapi.json", timeout=10)
    report = FuzzReport(api=name)
    started = time.monotonic()
    deadline = started + seconds
    settings = hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
        verbosity=Verbosity.quiet,
    )
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in SKIPPED:
            continue
        report.operations += 1
        headers = credential(operation.path)
        runs: list[tuple[GenerationMode, dict[str, Any]]] = [
            (GenerationMode.POSITIVE, {}),
            (GenerationMode.NEGATIVE, {}),
        ]
        names = {p.name for p in operation.path_parameters}
        fixed = {k: v for k, v in (known or {}).items() if k in names}
        if fixed and operation.method.upper() == "GET":
            runs.append((GenerationMode.POSITIVE, {"path_parameters": fixed}))
        for mode, extra in runs:
            if time.monotonic() > deadline:
                break
            strategy = operation.as_strategy(generation_mode=mode, **extra)
            # Unsatisfiable: nothing about the operation can be made invalid (no parameters).
            with contextlib.suppress(hypothesis.errors.Unsatisfiable):
                settings(given(strategy)(_caller(report, base_url, headers, deadline)))()
        call = _caller(report, base_url, headers, deadline)
        for case in _hostile_cases(operation, known or {}):
            call(case)
    report.seconds = time.monotonic() - started
    return report


def _hostile_cases(operation: Any, known: dict[str, str]) -> Iterator[Any]:
    """Each hostile value in each declared parameter (and property of a declared body)."""
    path = {p.name: known.get(p.name, "x") for p in operation.path_parameters}
    for parameter in operation.path_parameters:
        for value in HOSTILE_VALUES:
            yield operation.Case(path_parameters={**path, parameter.name: value})
    for parameter in operation.query:
        for value in HOSTILE_VALUES:
            yield operation.Case(path_parameters=path, query={parameter.name: value})
    for parameter in operation.headers:
        for value in HOSTILE_HEADERS:
            yield operation.Case(path_parameters=path, headers={parameter.name: value})
    for body in operation.body:
        properties = body.definition.get("schema", {}).get("properties", {})
        for name in properties:
            for value in HOSTILE_JSON:
                yield operation.Case(
                    path_parameters=path, body={name: value}, media_type=body.media_type
                )


def _caller(
    report: FuzzReport, base_url: str, headers: dict[str, str], deadline: float
) -> Callable[[Any], None]:
    def call(case: Any) -> None:
        if time.monotonic() > deadline:
            return
        try:
            answer = case.call(base_url=base_url, headers=headers, timeout=15)
        except requests.RequestException as exc:
            report.transport_errors.append(f"{case.method} {case.formatted_path}: {exc!r}")
            return
        report.cases += 1
        if answer.status_code >= 500:
            report.server_errors.append(
                f"{case.method} {case.formatted_path} query={case.query!r} "
                f"body={str(case.body)[:200]!r} -> {answer.status_code} {answer.text[:300]}"
            )

    return call


def control_plane_credential(admin: dict[str, str], customer: dict[str, str]) -> Callable:
    """The admin token for admin routes, the customer's session for everything else."""

    def credential(path: str) -> dict[str, str]:
        return admin if ADMIN_PATHS.match(path) else customer

    return credential


async def fuzz_platform(examples: int, seconds: float) -> list[FuzzReport]:
    """A platform of its own, fuzzed: the control plane, then the customer's instance."""
    from libs.servers.mosquitto import EmbeddedMosquitto
    from libs.servers.nats import EmbeddedNats
    from libs.servers.ports import free_port
    from libs.servers.postgres import EmbeddedPostgres
    from tests.security.tenant_platform import running_world
    from tests.support import create_database, make_settings

    with tempfile.TemporaryDirectory(prefix="iotistic-fuzz-") as tmp:
        folder = Path(tmp)
        postgres, nats = EmbeddedPostgres(folder / "pg"), EmbeddedNats(folder / "nats")
        broker = EmbeddedMosquitto(folder / "mosquitto")
        postgres.start()
        nats.start()
        broker.start()
        try:
            settings = make_settings(await create_database(postgres.url), nats.url)
            async with running_world(settings, broker, free_port(), folder) as world:
                device = await world.instance.post("/api/devices", json={"name": "fuzzed"})
                known = {
                    "customer_id": world.tenant.customer_id,
                    "device_id": device.json()["device_id"],
                }
                control = await asyncio.to_thread(
                    fuzz_api,
                    str(world.control.base_url).rstrip("/"),
                    control_plane_credential(world.admin, world.tenant.auth),
                    examples=examples,
                    seconds=seconds,
                    known=known,
                    name="control plane",
                )
                instance = await asyncio.to_thread(
                    fuzz_api,
                    world.tenant.instance_url,
                    lambda _: world.tenant.auth,
                    examples=examples,
                    seconds=seconds,
                    known=known,
                    name="instance",
                )
                return [control, instance]
        finally:
            broker.stop()
            nats.stop()
            postgres.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="just fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=200, help="cases per operation and mode")
    parser.add_argument("--seconds", type=float, default=600, help="time budget per API")
    args = parser.parse_args()
    from tests.bench.__main__ import machine

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request is no report

    print(f"machine: {machine()}")
    started = time.monotonic()
    reports = asyncio.run(fuzz_platform(args.examples, args.seconds))
    for report in reports:
        print(report.summary())
        for line in report.server_errors + report.transport_errors:
            print(f"  {line}")
    cases = sum(r.cases for r in reports)
    errors = sum(len(r.server_errors) for r in reports)
    print(f"total: {cases} cases, {errors} responses >= 500, {time.monotonic() - started:.0f} s")
    sys.exit(1 if errors or any(r.transport_errors for r in reports) else 0)


if __name__ == "__main__":
    main()
