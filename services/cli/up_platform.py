"""What ``iotistic up`` runs: the embedded Postgres, NATS and Mosquitto over the data folder,
every service on them in one process, and the servers stopped again however it ends."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from libs.config import EventLogSettings, load_settings
from libs.runtime.platform import Platform
from libs.runtime.supervision import Supervisor
from libs.servers.keeper import NatsWatchdog, ServerKeeper
from libs.servers.mosquitto import EmbeddedMosquitto
from libs.servers.nats import EmbeddedNats
from libs.servers.ports import port_is_free
from libs.servers.postgres import EmbeddedPostgres
from libs.servers.process import ChildServer, EmbeddedServerError, on_server_thread
from services.cli.data_folder import (
    LOCK_FILE,
    PORTS_FILE,
    PortBook,
    embedded_bus,
    end_leftover_instances,
    hold_data_folder,
    running_up_pid,
    secrets_env,
)
from services.cli.environment import RUNTIME_FILE, console
from services.cli.run import serve
from services.targets import definitions_for

log = logging.getLogger(__name__)


@dataclass
class EmbeddedServers:
    """The servers of one ``up``, on the ports kept for them, and the bus's credentials."""

    postgres: EmbeddedPostgres
    nats: EmbeddedNats
    mosquitto: EmbeddedMosquitto
    bus_folder: Path


def bring_up(data_dir: Path, host: str, port: int) -> int:
    """Take the data folder, start the servers and serve every service until interrupted;
    the servers are stopped however it ends. 1 when the port or the folder is taken."""
    if not port_is_free(host, port):
        console.print(
            f"[red]{host}:{port} is in use.[/red] Stop what runs there or pass "
            "--port to choose another."
        )
        return 1
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = hold_data_folder(data_dir)  # held until this process ends, however it ends
    if lock is None:
        try:
            holder = (data_dir / LOCK_FILE).read_text().strip()
        except OSError:
            holder = "?"
        console.print(
            f"[red]iotistic up already runs on {data_dir} (pid {holder}).[/red] Use it, or "
            "stop it first."
        )
        return 1
    # (The lock above is what refuses a second `up`: a runtime file's pid can be reused.)
    secrets, given = secrets_env(data_dir, os.environ)
    servers = _prepare_servers(data_dir)
    try:
        _start_and_serve(servers, data_dir, secrets, given, host, port)
    finally:
        if running_up_pid(data_dir) == os.getpid():
            (data_dir / RUNTIME_FILE).unlink(missing_ok=True)
        console.print("stopping Mosquitto, NATS and Postgres ...")
        # On the thread that (re)starts them: a restart under way finishes first.
        for server in (servers.mosquitto, servers.nats, servers.postgres):
            _stop_quietly(server)
        console.print("stopped; data kept in", str(data_dir))
    return 0


def _prepare_servers(data_dir: Path) -> EmbeddedServers:
    """The servers over the data folder, on their kept ports, with what an earlier run left
    stopped first."""
    book = PortBook(data_dir / PORTS_FILE)
    postgres = EmbeddedPostgres(
        data_dir / "postgres",
        port=book.recorded("postgres"),
        password_file=data_dir / "secrets" / "postgres-password",
    )
    bus_folder, authorization = embedded_bus(data_dir, load_settings(EventLogSettings, os.environ))
    nats_server = EmbeddedNats(
        data_dir / "nats",
        port=book.recorded("nats"),
        monitor_port=book.recorded("nats-monitor"),
        authorization=authorization,
    )
    mosquitto = EmbeddedMosquitto(
        data_dir / "mosquitto", port=book.recorded("mqtt"), ws_port=book.recorded("mqtt-ws")
    )
    servers: list[ChildServer] = [postgres, nats_server, mosquitto]
    # What an earlier run left (it was killed and something outlived it) holds the data and
    # the ports: stop it first. Instances first, since they hold connections to Postgres.
    end_leftover_instances(data_dir / "instances")
    for server in servers:
        server.clear_leftovers()
    postgres.port = book.take("postgres", postgres.host)
    nats_server.port = book.take("nats", nats_server.host)
    nats_server.monitor_port = book.take("nats-monitor", "127.0.0.1")
    mosquitto.port = book.take("mqtt", mosquitto.host)
    mosquitto.ws_port = book.take("mqtt-ws", mosquitto.host)
    book.save()
    return EmbeddedServers(postgres, nats_server, mosquitto, bus_folder)


def _start_and_serve(
    servers: EmbeddedServers,
    data_dir: Path,
    secrets: dict[str, str],
    given: list[str],
    host: str,
    port: int,
) -> None:
    """Start the servers, publish their URLs in the runtime file, serve until interrupted."""
    http_url = f"http://{host}:{port}"
    console.print("starting Postgres, NATS and Mosquitto ...")
    servers.postgres.start()
    servers.nats.start()
    broker = _start_broker(servers.mosquitto)
    database_url = servers.postgres.create_database("iotistic")
    env = {
        **os.environ,
        **secrets,
        "DATABASE_URL": database_url,
        "NATS_URL": servers.nats.url,
        "NATS_CREDENTIALS_DIR": str(servers.bus_folder),
        # The local backend: instances here, on the embedded broker, verifying licenses
        # with this process's JWKS.
        "PROVISIONER_BACKEND": "local",
        "LOCAL_INSTANCES_DIR": str(data_dir / "instances"),
        "LICENSE_JWKS_URL": f"{http_url}/.well-known/jwks.json",
        "CONTROL_PLANE_URL": http_url,
        # Back from Stripe to the account page of this process, unless told otherwise.
        "BILLING_RETURN_URL": os.environ.get("BILLING_RETURN_URL") or f"{http_url}/account",
        # The base of the links signup mails (never the request's Host header).
        "PUBLIC_URL": os.environ.get("PUBLIC_URL") or http_url,
        **broker,
    }
    platform = Platform.from_environ(definitions_for("all"), env)
    kept = [servers.postgres, servers.nats, *([servers.mosquitto] if broker else [])]
    mqtt_url = servers.mosquitto.url if broker else None
    _write_runtime_file(
        data_dir / RUNTIME_FILE,
        {
            "DATABASE_URL": database_url,
            "NATS_URL": servers.nats.url,
            "NATS_CREDENTIALS_DIR": str(servers.bus_folder),
            "MQTT_URL": mqtt_url,
            "HTTP_URL": http_url,
            "pid": os.getpid(),
            "servers": {server.name: server.pid for server in kept},
        },
    )
    _print_up(
        data_dir,
        servers.postgres.shown_url.removesuffix("/postgres") + "/iotistic",
        servers.nats.url,
        mqtt_url or "not running (install mosquitto)",
        http_url,
        given,
    )
    asyncio.run(_serve_up(platform, ServerKeeper(kept), servers.nats, host, port))


def _write_runtime_file(path: Path, published: dict[str, Any]) -> None:
    # Owner only: the database URL in it carries the password.
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(json.dumps(published, indent=2))


def _stop_quietly(server: ChildServer) -> None:
    try:
        on_server_thread(server.stop)
    except (OSError, EmbeddedServerError, concurrent.futures.CancelledError) as exc:
        log.error("stopping %s failed: %s", server.name, exc)


async def _serve_up(
    platform: Platform, keeper: ServerKeeper, nats_server: EmbeddedNats, host: str, port: int
) -> None:
    """The platform, and what `up` does for its embedded servers as a supervisor would."""
    supervisor = Supervisor("up")
    # A server that dies is started again; readiness says which is down meanwhile.
    supervisor.spawn("embedded servers", keeper.run)
    platform.checks["servers"] = keeper.readiness
    # A NATS whose JetStream stays broken after its disk was full is restarted.
    supervisor.spawn("nats watchdog", NatsWatchdog(nats_server).run)
    try:
        await serve(platform, "all", host, port)
    finally:
        await supervisor.stop(0)


def _start_broker(mosquitto: EmbeddedMosquitto) -> dict[str, str]:
    """Start the device broker; without Mosquitto on the machine, go on without one."""
    try:
        mosquitto.start()
    except EmbeddedServerError as exc:
        console.print(f"[yellow]no device broker:[/yellow] {exc}")
        return {}
    return {
        "MQTT_HOST": mosquitto.host,
        "MQTT_PORT": str(mosquitto.port),
        "MQTT_ADMIN_USERNAME": mosquitto.admin_username,
        "MQTT_ADMIN_PASSWORD": mosquitto.admin_password,
    }


def _print_up(
    data_dir: Path,
    database_url: str,
    nats_url: str,
    mqtt_url: str,
    http_url: str,
    given: list[str],
) -> None:
    table = Table(title="Iotistic is running (Ctrl-C stops everything)", show_header=False)
    table.add_row("API, health, metrics", http_url)
    table.add_row("readiness", f"{http_url}/health/ready")
    table.add_row("OpenAPI", f"{http_url}/schema/openapi.json")
    table.add_row(
        "Postgres",
        f"{database_url}  (password: {data_dir / 'secrets' / 'postgres-password'})",
    )
    table.add_row(
        "NATS JetStream",
        f"{nats_url}  (sync_interval: always; a user per service, passwords in "
        f"{data_dir / 'secrets' / 'nats'})",
    )
    table.add_row("MQTT (Mosquitto)", mqtt_url)
    table.add_row("deployment queue", f"{http_url}/admin/queues  (admin token as password)")
    table.add_row("data folder", str(data_dir))
    if "ADMIN_TOKEN" in given:
        table.add_row("admin token", "ADMIN_TOKEN from the environment")
    else:
        table.add_row("admin token", f"{data_dir / 'secrets' / 'admin-token'}  (file, owner only)")
    if not os.environ.get("STRIPE_WEBHOOK_SECRET"):
        table.add_row(
            "Stripe webhooks",
            "refused (503) until STRIPE_WEBHOOK_SECRET is set: `stripe listen --forward-to "
            f"{http_url.removeprefix('http://')}/webhooks/stripe` prints one",
        )
    others = [name for name in given if name != "ADMIN_TOKEN"]
    if others:
        table.add_row("from the environment", ", ".join(others))
    console.print(table)
