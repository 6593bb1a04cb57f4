"""``iotistic up``: the whole platform on one machine, over one data folder, owning its servers.

What ``up`` starts ends with it, however it ends: Ctrl-C stops Mosquitto, NATS and Postgres
in that order; a kill -9 of ``up`` has the kernel stop them and the instances (their
parent-death signal). What an earlier run could not stop is found by its data folder and
stopped before anything starts over that data. The servers' ports are kept in
``<data>/ports.json`` and taken again at the next start when they are free, so everything is
where it was; while ``up`` runs, a server that dies is started again on the same port
(``ServerKeeper``), and ``/health/ready`` shows it down meanwhile.

Secrets set in the environment (``ADMIN_TOKEN``, ``SESSION_SECRET``, ...) are used as given;
only the missing ones are generated, once, into ``<data>/secrets``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path

import psutil
from rich.table import Table

from libs.config import EventLogSettings, load_settings
from libs.runtime.platform import Platform
from libs.runtime.supervision import Supervisor
from libs.servers.keeper import NatsWatchdog, ServerKeeper
from libs.servers.mosquitto import EmbeddedMosquitto
from libs.servers.nats import EmbeddedNats
from libs.servers.ports import STANDARD_PORTS as _STANDARD_PORTS
from libs.servers.ports import kept_port, port_is_free
from libs.servers.postgres import EmbeddedPostgres
from libs.servers.process import ChildServer as _ChildServer
from libs.servers.process import EmbeddedServerError, end_processes, on_server_thread
from services.cli import (
    LOCK_FILE,
    RUNTIME_FILE,
    console,
    embedded_bus,
    generated_secret,
    license_keys,
    running_up_pid,
    serve,
)
from services.provisioner.backends.local.processes import instances_running
from services.targets import definitions_for

log = logging.getLogger(__name__)

PORTS_FILE = "ports.json"
# Secrets taken from the environment when set there, else generated into <data>/secrets/<file>.
SECRETS = {
    "ADMIN_TOKEN": "admin-token",
    "SESSION_SECRET": "session-secret",
    "PROVISIONER_SECRET": "provisioner-secret",
    "USAGE_SECRET": "usage-secret",
    "LOGIN_RELAY_SECRET": "login-relay-secret",
}
# Secrets the instances' stored credentials are derived from: changing one locks them out.
DERIVING = frozenset({"PROVISIONER_SECRET"})
# How long instances left by an earlier run get to stop before they are killed.
INSTANCE_GRACE = 10.0


class PortBook:
    """The ports of the embedded servers, kept in ``<data>/ports.json`` (owner only)."""

    def __init__(self, path: Path) -> None:
        """Read the ports an earlier start kept, if any."""
        self.path = path
        try:
            loaded = json.loads(path.read_text())
            self.ports: dict[str, int] = {k: int(v) for k, v in loaded.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            self.ports = {}
        # A hand-edited or damaged file: never port 0, one out of range or a standard one.
        self.ports = {
            k: v for k, v in self.ports.items() if 1024 <= v <= 65535 and v not in _STANDARD_PORTS
        }

    def recorded(self, name: str) -> int | None:
        """The port kept for ``name``, whether or not it is free now."""
        return self.ports.get(name)

    def take(self, name: str, host: str) -> int:
        """The kept port of ``name`` when it is free, else a new one (kept from now on)."""
        before = self.ports.get(name)
        port = kept_port(before, host)
        if before is not None and port != before:
            console.print(
                f"[yellow]{name}: port {before} is taken by another program; using {port}[/yellow]"
            )
        self.ports[name] = port
        return port

    def save(self) -> None:
        """Write the ports down for the next start."""
        temporary = self.path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(self.ports, handle, indent=2, sort_keys=True)
        temporary.replace(self.path)


def secrets_env(data_dir: Path, environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The platform's secrets, and the names of those taken from the environment."""
    env: dict[str, str] = {}
    given: list[str] = []
    for variable, file in SECRETS.items():
        value = environ.get(variable, "").strip()
        kept = data_dir / "secrets" / file
        if value and variable in DERIVING and kept.exists() and kept.read_text().strip() != value:
            # The instances' database and broker passwords derive from it (a secret given in
            # the environment is never written to disk): say what a change costs.
            console.print(
                f"[yellow]{variable} differs from the one generated in {kept}: every "
                "instance's credentials change, and each is degraded until the health watch "
                "redeploys it (about a minute)[/yellow]"
            )
        if value:
            given.append(variable)
            env[variable] = value
        else:
            env[variable] = generated_secret(data_dir, file)
    keys = environ.get("LICENSE_KEYS_DIR", "").strip()
    if keys:
        given.append("LICENSE_KEYS_DIR")
    env["LICENSE_KEYS_DIR"] = keys or str(license_keys(data_dir))
    return env, given


def end_leftover_instances(instances_dir: Path) -> int:
    """Stop instance processes of this data folder that an earlier run left running (they
    would keep old settings and hold the database); returns how many there were."""
    prefix = f"{instances_dir}{os.sep}"
    instances = []
    for pid in instances_running().values():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.environ().get("LICENSE_FILE", "").startswith(prefix):
                instances.append(proc)
    if instances:
        console.print(
            f"stopping {len(instances)} instance(s) left running by an earlier run "
            "(they start again with this one)"
        )
        end_processes(instances, signal.SIGTERM, grace=INSTANCE_GRACE)
    return len(instances)


def hold_data_folder(data_dir: Path) -> int | None:
    """Take the data folder for this `up` (an exclusive flock on ``<data>/up.lock``, not
    inherited by children, released by the kernel however `up` ends): the fd, or None when
    another `up` holds it, even one still starting and without a runtime file yet."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def cmd_up(args: argparse.Namespace) -> int:
    """``iotistic up``: embedded Postgres, NATS and Mosquitto, then target all."""
    data_dir = Path(args.data_dir).resolve()
    try:
        return _cmd_up(args, data_dir)
    except EmbeddedServerError as exc:
        console.print(f"[red]iotistic up could not start:[/red] {exc}")
        return 1


def _cmd_up(args: argparse.Namespace, data_dir: Path) -> int:
    if not port_is_free(args.host, args.port):
        console.print(
            f"[red]{args.host}:{args.port} is in use.[/red] Stop what runs there or pass "
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
    http_url = f"http://{args.host}:{args.port}"
    secrets, given = secrets_env(data_dir, os.environ)
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
    servers: list[_ChildServer] = [postgres, nats_server, mosquitto]
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
    runtime_file = data_dir / RUNTIME_FILE
    try:
        console.print("starting Postgres, NATS and Mosquitto ...")
        postgres.start()
        nats_server.start()
        broker = _start_broker(mosquitto)
        database_url = postgres.create_database("iotistic")
        env = {
            **os.environ,
            **secrets,
            "DATABASE_URL": database_url,
            "NATS_URL": nats_server.url,
            "NATS_CREDENTIALS_DIR": str(bus_folder),
            # The local backend: instances here, on the embedded broker, verifying licenses
            # with this process's JWKS.
            "PROVISIONER_BACKEND": "local",
            "LOCAL_INSTANCES_DIR": str(data_dir / "instances"),
            "LICENSE_JWKS_URL": f"{http_url}/.well-known/jwks.json",
            "CONTROL_PLANE_URL": http_url,
            **broker,
        }
        platform = Platform.from_environ(definitions_for("all"), env)
        kept = [postgres, nats_server, *([mosquitto] if broker else [])]
        # Owner only: the database URL in it carries the password.
        runtime_file.touch(mode=0o600)
        runtime_file.chmod(0o600)
        runtime_file.write_text(
            json.dumps(
                {
                    "DATABASE_URL": database_url,
                    "NATS_URL": nats_server.url,
                    "NATS_CREDENTIALS_DIR": str(bus_folder),
                    "MQTT_URL": mosquitto.url if broker else None,
                    "HTTP_URL": http_url,
                    "pid": os.getpid(),
                    "servers": {server.name: server.pid for server in kept},
                },
                indent=2,
            )
        )
        _print_up(
            data_dir,
            postgres.shown_url.removesuffix("/postgres") + "/iotistic",
            nats_server.url,
            mosquitto.url if broker else "not running (install mosquitto)",
            http_url,
            given,
        )
        asyncio.run(_serve_up(platform, ServerKeeper(kept), nats_server, args.host, args.port))
    finally:
        if running_up_pid(data_dir) == os.getpid():
            runtime_file.unlink(missing_ok=True)
        console.print("stopping Mosquitto, NATS and Postgres ...")
        # On the thread that (re)starts them: a restart under way finishes first.
        for server in (mosquitto, nats_server, postgres):
            _stop_quietly(server)
        console.print("stopped; data kept in", str(data_dir))
    return 0


def _stop_quietly(server: _ChildServer) -> None:
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
