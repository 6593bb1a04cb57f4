"""``iotistic run --target``: serve one target against the Postgres and NATS given by URL."""

from __future__ import annotations

import argparse
import asyncio
import logging

from libs.http.server import GracefulServer, server_config
from libs.observability.telemetry import setup_tracing, shutdown_tracing
from libs.runtime.platform import Platform
from services.cli.environment import environment
from services.targets import TARGETS, build_app, definitions_for


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``run``'s arguments."""
    run = subparsers.add_parser(
        "run",
        help="run one target against Postgres and NATS given by URL",
        description="Serve one target (a service, all of them, or a customer's instance) "
        "against the Postgres of DATABASE_URL and the NATS of NATS_URL (with its bus password "
        "in NATS_CREDENTIALS_DIR), configured by the environment "
        "(docs/reference.md, Configuration).",
    )
    run.add_argument(
        "--target", choices=TARGETS, default="all", help="what to serve (default: %(default)s)"
    )
    run.add_argument("--host", help="HTTP address (default: HTTP_HOST)")
    run.add_argument("--port", type=int, help="HTTP port (default: HTTP_PORT)")
    run.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    """``iotistic run --target``: serve one target until interrupted."""
    if args.target == "instance":
        return run_instance(args)
    platform = Platform.from_environ(definitions_for(args.target), environment(args))
    host = args.host or platform.settings.http_host
    port = args.port or platform.settings.http_port
    asyncio.run(serve(platform, args.target, host, port))
    return 0


def run_instance(args: argparse.Namespace) -> int:
    """``iotistic run --target instance``: one customer's instance (``python -m
    services.instance`` is the same without this command's other targets and tools)."""
    from services.instance.server import serve_instance

    return serve_instance(args.host, args.port)


async def serve(platform: Platform, target: str, host: str, port: int) -> None:
    """Run a target's platform and HTTP app until the server is told to stop."""
    settings = platform.settings
    logging.getLogger().setLevel(settings.log_level)
    provider = setup_tracing(f"iotistic-{target}", settings.otel_exporter)
    app = build_app(platform, target)
    config = server_config(app, host, port, settings.log_level)
    try:
        await GracefulServer(config).serve()
    finally:
        shutdown_tracing(provider)
