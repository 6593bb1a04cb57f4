"""Which services a target runs, and the HTTP app of a process (one service or all of them)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

from litestar import Litestar, Router
from litestar.connection import ASGIConnection

from libs.eventlog.errors import EventStoreError
from libs.http.app import create_app
from libs.http.asyncapi import asyncapi_document
from libs.http.auth import admin_guard
from libs.observability.telemetry import name_request_span
from libs.runtime.platform import Platform
from libs.runtime.service import ServiceDefinition
from services.billing.app import BILLING
from services.licensing.app import LICENSING
from services.operations import operations_routes
from services.provisioner.app import PROVISIONER
from services.signup.app import SIGNUP

CONTROL_PLANE: dict[str, ServiceDefinition] = {
    d.name: d for d in (SIGNUP, LICENSING, BILLING, PROVISIONER)
}

Target = Literal["all", "signup", "licensing", "billing", "provisioner", "instance"]
# ``instance`` is the data plane: one per customer, started by the provisioner's backends.
TARGETS: tuple[str, ...] = ("all", *CONTROL_PLANE, "instance")


def definitions_for(target: str) -> list[ServiceDefinition]:
    """The services a target hosts: every control-plane service for ``all``."""
    if target == "all":
        return list(CONTROL_PLANE.values())
    if target not in CONTROL_PLANE:
        raise ValueError(
            f"unknown control-plane target {target!r}; choose one of {', '.join(TARGETS)}"
        )
    return [CONTROL_PLANE[target]]


def _named_for(service: str) -> Callable[[ASGIConnection[Any, Any, Any, Any], Any], None]:
    def name_span(_: ASGIConnection[Any, Any, Any, Any], __: Any) -> None:
        name_request_span(service)

    return name_span


def build_app(platform: Platform, target: str) -> Litestar:
    """The HTTP app of a process: each hosted service's routes, health, metrics, operations."""

    @asynccontextmanager
    async def run_platform(_: Litestar) -> AsyncIterator[None]:
        await platform.start()
        try:
            yield
        finally:
            await platform.stop()

    admin = Router(
        path="/api/admin",
        route_handlers=operations_routes(platform),
        guards=[admin_guard(platform.settings.admin_token)],
        tags=["admin"],
    )
    service_routes = []
    for definition in platform.definitions:
        handlers = list(definition.routes(platform.runtime_of(definition.name)))
        if handlers:
            service_routes.append(
                Router(
                    path="/",
                    route_handlers=handlers,
                    tags=[definition.name],
                    # Its requests' spans are the service's, also when one process serves all
                    # (a guard that lets everything through: guards add up across layers,
                    # where a router's before_request would replace the app's input checks).
                    guards=[_named_for(definition.name)],
                )
            )
    return create_app(
        title=f"Iotistic ({target})",
        # The event log's AsyncAPI document, next to the OpenAPI one at /schema.
        route_handlers=[admin, asyncapi_document, *service_routes],
        readiness=platform.readiness,
        registry=platform.registry,
        lifespan=[run_platform],
        unavailable=[EventStoreError],
    )
