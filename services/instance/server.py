"""Serving one customer's instance: the process a backend starts, hundreds to a machine.

Every instance pays for each module it loads, so this path loads the instance and nothing of
the ``iotistic`` command's control plane and operators' tools (``python -m services.instance``;
``iotistic run --target instance`` serves the same way, having loaded the command first).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

# Optional integrations of libraries the instance loads and never uses, each tried by its
# library and skipped when missing (USS saved per instance, measured): litestar's pydantic
# plugins (the instance's types are msgspec Structs; about 6 MiB) and its OpenTelemetry
# middleware (no span per request unless spans are exported: OTEL_EXPORTER; about 2 MiB),
# httpx's command-line client (click, rich, pygments; about 4 MiB) and paho-mqtt's DNS SRV
# lookup (dnspython; about 2 MiB).
UNUSED_OPTIONAL_MODULES = ("pydantic", "opentelemetry.instrumentation", "httpx._main", "dns")
REQUEST_TRACING_MODULES = ("opentelemetry.instrumentation",)
SERVICE = "instance"


def skip_unused_optional_modules(request_tracing: bool = False) -> None:
    """Make the imports of ``UNUSED_OPTIONAL_MODULES`` fail, as if they were not installed,
    unless something loaded them already (``iotistic run`` may have); with
    ``request_tracing``, OpenTelemetry's instrumentation stays importable."""
    for name in UNUSED_OPTIONAL_MODULES:
        if not (request_tracing and name in REQUEST_TRACING_MODULES):
            sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def serve_instance(host: str | None = None, port: int | None = None) -> int:
    """Serve the instance its environment describes (``InstanceSettings``) until stopped, its
    spans (service ``iotistic-instance``) exported as ``OTEL_EXPORTER`` says and flushed at
    exit."""
    # Settings are read only once these are skipped: litestar tries them as it is imported.
    skip_unused_optional_modules(os.environ.get("OTEL_EXPORTER", "none") not in ("", "none"))
    from libs.config import load_settings
    from libs.http.server import GracefulServer, server_config
    from libs.observability.telemetry import (
        service_name,
        serving,
        setup_tracing,
        shutdown_tracing,
    )
    from services.instance.app import create_instance_app
    from services.instance.settings import InstanceSettings
    from services.instance.start import CUSTOMER_ATTRIBUTE

    settings = load_settings(InstanceSettings, os.environ)
    logging.getLogger().setLevel(settings.log_level)
    provider = setup_tracing(
        service_name(SERVICE),
        settings.otel_exporter,
        attributes={CUSTOMER_ATTRIBUTE: settings.instance_customer_id},
    )
    # Every task of the process (the server's, the supervisor's) is the instance's.
    serving(SERVICE)
    config = server_config(
        create_instance_app(settings),
        host or settings.http_host,
        port or settings.http_port,
        settings.log_level,
    )
    try:
        # Woken once a second rather than ten times: one of hundreds of idle processes.
        asyncio.run(GracefulServer(config, tick_seconds=1.0).serve())
    finally:
        shutdown_tracing(provider)
    return 0
