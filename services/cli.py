"""The ``iotistic`` command: run a target, bring the platform up, replay, look at the log."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import asyncpg
import nats.js.errors
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from contracts import MalformedEvent, decode_envelope
from libs.config import ConfigError, EventLogSettings, ServiceSettings, load_settings
from libs.db.postgres import CONNECTION_ERRORS
from libs.eventlog.bus_auth import OPERATOR, BusAuthError
from libs.eventlog.connection import NATS_ERRORS, connect_bus
from libs.eventlog.errors import EventStoreError
from libs.eventlog.reader import StoredMessage
from libs.eventlog.store import EventStore
from libs.http.server import GracefulServer, server_config
from libs.observability.logs import configure_logging
from libs.observability.telemetry import setup_tracing
from libs.projections.parking import decide, open_parked
from libs.projections.replay import replay_service
from libs.projections.reports import ProjectionCheck, ReplayError, ReplayReport, TableDiff
from libs.projections.verify import VERIFY_WAIT_SECONDS
from libs.runtime.platform import Platform
from services.licensing.keys import KeyConfigError
from services.targets import CONTROL_PLANE, TARGETS, build_app, definitions_for

if TYPE_CHECKING:
    from services.provisioner.backends.base import InstanceSpec
    from services.provisioner.backends.kubernetes.backend import KubernetesBackend
    from services.provisioner.rollout import RolloutPlan
    from services.provisioner.settings import ProvisionerSettings

log = logging.getLogger("iotistic")
console = Console(stderr=True)

DEFAULT_DATA_DIR = ".iotistic"
RUNTIME_FILE = "runtime.json"
# Held (flock) by the `up` that runs on the data folder; the kernel releases it however `up` ends.
LOCK_FILE = "up.lock"


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``iotistic`` console script."""
    args = _parser().parse_args(argv)
    setup_logging(args.command)
    try:
        code = args.func(args)
    except (ConfigError, KeyConfigError, BusAuthError) as exc:
        console.print(f"[red]configuration error:[/red] {exc}")
        code = 2
    except KeyboardInterrupt:
        code = 130
    except (*NATS_ERRORS, *CONNECTION_ERRORS, asyncpg.PostgresError, EventStoreError) as exc:
        # An unreachable or refusing server is the operator's to fix: say which, no traceback.
        console.print(f"[red]error:[/red] {server_error_line(exc)}")
        code = 1
    sys.exit(code or 0)


# JetStream's codes for "no room to store it": insufficient resources, storage resources
# exceeded, and a consumer store that could not be created; a server may send that last one
# as a general consumer-creation error (10012), so its words are matched too.
_JETSTREAM_STORAGE_FULL = {10023, 10047, 10104}
_STORAGE_FULL_WORDS = ("no space left on device", "creating store", "insufficient")


def server_error_line(exc: BaseException) -> str:
    """One line for an error a server gave; a NATS server out of disk is named as such."""
    err_code = getattr(exc, "err_code", None)
    description = str(getattr(exc, "description", None) or exc)
    if err_code in _JETSTREAM_STORAGE_FULL or any(
        words in description.lower() for words in _STORAGE_FULL_WORDS
    ):
        # Reads that make a consumer (export, tail, replay) need a little of its disk.
        return (
            "the NATS server has no room to store what this command needs (its JetStream disk "
            f"or storage limit is full): free space there and try again ({description})"
        )
    return f"{type(exc).__name__}: {exc}"


def _describe(parser: argparse.ArgumentParser) -> None:
    """Every subcommand's --help opens with its one-line help where it has no description."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, subparser in action.choices.items():
                if subparser.description is None and helps.get(name):
                    subparser.description = str(helps[name])
                _describe(subparser)


def setup_logging(command: str) -> None:
    """The process's logging: one escaped line per record, uvicorn's included.

    See ``libs.observability.logs``.
    """
    # Servers log what they do; the operator's one-shot commands only what went wrong.
    quiet = "WARNING" if command not in ("run", "up") else "INFO"
    configure_logging(os.environ.get("LOG_LEVEL", quiet))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iotistic",
        description="Iotistic's command: bring the platform up on one machine, run one service "
        "against your Postgres and NATS, replay and look at the event log, and the "
        "provisioner's and the bus's tools. `iotistic <command> --help` says more.",
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("IOTISTIC_DATA_DIR", DEFAULT_DATA_DIR),
        help="folder of the embedded platform (default: %(default)s); other commands read the "
        "URLs of a running `iotistic up` from it when DATABASE_URL/NATS_URL are not set",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run one target against Postgres and NATS given by URL",
        description="Serve one target (a service, all of them, or a customer's instance) "
        "against the Postgres of DATABASE_URL and the NATS of NATS_URL (with its bus password "
        "in NATS_CREDENTIALS_DIR), configured by the environment (README, Configuration).",
    )
    run.add_argument(
        "--target", choices=TARGETS, default="all", help="what to serve (default: %(default)s)"
    )
    run.add_argument("--host", help="HTTP address (default: HTTP_HOST)")
    run.add_argument("--port", type=int, help="HTTP port (default: HTTP_PORT)")
    run.set_defaults(func=cmd_run)

    up = sub.add_parser(
        "up",
        help="start embedded Postgres, NATS and Mosquitto, then target all",
        description="The whole platform on this machine: embedded Postgres, NATS JetStream and "
        "Mosquitto, and every service, in the folder of --data-dir (given before `up`; "
        "default .iotistic), where secrets are generated at first run. Ctrl-C stops it all; "
        "the data is kept.",
    )
    up.add_argument("--host", default="127.0.0.1", help="HTTP address (default: %(default)s)")
    up.add_argument("--port", type=int, default=8080, help="HTTP port (default: %(default)s)")
    up.set_defaults(func=cmd_up)

    replay = sub.add_parser("replay", help="rebuild a service's read models from the log")
    replay.add_argument(
        "service", choices=sorted(CONTROL_PLANE), help="the service whose read models to rebuild"
    )
    replay.add_argument(
        "--from-seq",
        type=int,
        default=1,
        help="first stream sequence to read (with --dry-run or --verify only)",
    )
    replay.add_argument("--dry-run", action="store_true", help="rebuild and report, change nothing")
    replay.add_argument(
        "--verify",
        action="store_true",
        help="measure each projection against the head of the log and compare its rows with "
        "a rebuild into a scratch schema; exit 1 on a difference or a projection behind",
    )
    replay.add_argument(
        "--max-lag",
        type=_count,
        help="with --verify: events a projection may be behind the head (default 0: at the head)",
    )
    replay.add_argument(
        "--wait",
        type=float,
        help="with --verify: seconds to wait for the projections to reach the head "
        f"(default {VERIFY_WAIT_SECONDS:g})",
    )
    replay.add_argument("--json", action="store_true", help="the report as JSON")
    replay.set_defaults(func=cmd_replay)

    events = sub.add_parser("events", help="look at the event log")
    ev = events.add_subparsers(dest="events_command", required=True)
    tail = ev.add_parser("tail", help="follow the log as events arrive")
    tail.add_argument("--from-seq", type=int, help="start here instead of at the end")
    tail.add_argument("--type", action="append", dest="types", help="only this event type")
    tail.add_argument("--json", action="store_true", help="print whole envelopes")
    tail.set_defaults(func=cmd_events_tail)
    export = ev.add_parser("export", help="export a range of the log as JSON lines")
    export.add_argument(
        "--from-seq", type=int, default=1, help="first stream sequence (default: %(default)s)"
    )
    export.add_argument("--to-seq", type=int, help="last stream sequence (default: the head)")
    export.add_argument("--type", action="append", dest="types", help="only this event type")
    export.add_argument("--output", "-o", help="file to write (default: standard output)")
    export.set_defaults(func=cmd_events_export)
    init = ev.add_parser(
        "init",
        help="create the event stream, or bring it to the EVENTS_* settings (as the operator)",
    )
    init.set_defaults(func=cmd_events_init)
    stats = ev.add_parser("stats", help="event counts per type")
    stats.add_argument("--json", action="store_true", help="the counts as JSON")
    stats.set_defaults(func=cmd_events_stats)

    bus = sub.add_parser("bus", help="who may publish and consume what on the event bus")
    bs = bus.add_subparsers(dest="bus_command", required=True)
    permissions = bs.add_parser(
        "permissions", help="each event's owner and each bus user's subjects, from the code"
    )
    permissions.add_argument("--json", action="store_true", help="as JSON (for the chart)")
    permissions.set_defaults(func=cmd_bus_permissions)
    config = bs.add_parser(
        "config",
        help="write a nats-server `authorization` block for the control plane's users, making "
        "a password for each user that has none",
    )
    config.add_argument(
        "--credentials-dir",
        required=True,
        help="folder of the users' passwords, one file per user (made if missing)",
    )
    config.add_argument("--out", help="file to write (default: standard output)")
    config.set_defaults(func=cmd_bus_config)

    parked = sub.add_parser("parked", help="events projections could not apply")
    pk = parked.add_subparsers(dest="parked_command", required=True)
    pk.add_parser("list", help="open parked events of every service").set_defaults(
        func=cmd_parked_list
    )
    for decision in ("skip", "retry"):
        p = pk.add_parser(decision, help=f"{decision} a parked event; the projection resumes")
        p.add_argument("service", choices=sorted(CONTROL_PLANE), help="the projection's service")
        p.add_argument("projection", help="the projection's name (`iotistic parked list`)")
        p.add_argument("seq", type=int, help="the parked event's stream sequence")
        p.set_defaults(func=cmd_parked_decide, decision=decision)

    provisioner = sub.add_parser("provisioner", help="the provisioner's tools")
    pv = provisioner.add_subparsers(dest="provisioner_command", required=True)
    render = pv.add_parser(
        "render", help="print a customer's Kubernetes manifests as YAML (for GitOps)"
    )
    render.add_argument("customer_id", help="the customer whose manifests to print")
    render.add_argument(
        "--license-file", help="the license JWT to put in (default: the customer's current one)"
    )
    render.add_argument("--plan", default="starter", help="plan, with --license-file")
    render.add_argument(
        "--include-secrets",
        action="store_true",
        help="also print the Secrets (license, passwords, tokens: values in clear text)",
    )
    render.add_argument(
        "--credentials-generation",
        type=_count,
        default=0,
        help="the customer's credentials generation (its namespace's "
        "iotistic.io/credentials-generation; 0 until rotated)",
    )
    render.set_defaults(func=cmd_provisioner_render)
    drill = pv.add_parser(
        "restore-drill",
        help="restore a customer's newest backup into a scratch database, count it, report",
    )
    drill.add_argument("customer_id", help="the customer whose newest backup to restore")
    drill.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds to wait for the drill's Job"
    )
    drill.set_defaults(func=cmd_provisioner_restore_drill)
    restore = pv.add_parser(
        "restore",
        help="put a customer's backup back over their database (the instance stopped meanwhile)",
    )
    restore.add_argument("customer_id", help="the customer whose data to put back")
    restore.add_argument("--dump", help="the dump's file name (default: the newest intact one)")
    restore.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="seconds to wait for the restore's Job (default: %(default)s)",
    )
    restore.add_argument(
        "--yes", action="store_true", help="yes, replace the customer's data with the dump's"
    )
    restore.set_defaults(func=cmd_provisioner_restore)
    purge = pv.add_parser(
        "purge", help="delete the namespaces of deleted customers whose grace period is over"
    )
    purge.set_defaults(func=cmd_provisioner_purge)
    rotate = pv.add_parser(
        "rotate-credentials",
        help="give a customer's instance new database and broker passwords (kubernetes)",
    )
    rotate.add_argument("customer_id", help="the customer whose credentials to rotate")
    rotate.set_defaults(func=cmd_provisioner_rotate_credentials)
    rollout = pv.add_parser(
        "rollout",
        help="bring every deployed customer to today's manifests (a new INSTANCE_IMAGE), "
        "through the queue, in batches each behind a health gate; stops on failure",
        description="Run where the provisioner runs, with its settings (INSTANCE_IMAGE, "
        "PROVISIONER_SECRET, DATABASE_URL, the cluster's credentials), once its workers run "
        "the new version: the workers apply, this command queues and gates. Customers already "
        "on today's manifests (their namespace's iotistic.io/manifest-sha256) are skipped, so "
        "a stopped rollout run again carries on. Exit 0: all updated; 1: stopped on a failure.",
    )
    rollout.add_argument("--batch-size", type=_positive, default=10, help="default: %(default)s")
    rollout.add_argument(
        "--canary", type=_count, default=1, help="customers in the first batch (default: 1)"
    )
    rollout.add_argument(
        "--max-failures",
        type=_count,
        default=0,
        help="failed customers tolerated before stopping (default: 0)",
    )
    rollout.add_argument(
        "--only", nargs="+", metavar="CUSTOMER_ID", help="these customers only (still gated)"
    )
    rollout.add_argument(
        "--force", action="store_true", help="also those already on today's manifests"
    )
    rollout.add_argument(
        "--dry-run", action="store_true", help="list the customers and batches; queue nothing"
    )
    rollout.add_argument(
        "--batch-timeout",
        type=float,
        default=900.0,
        help="seconds a batch's jobs and health gate may take (default: %(default)s)",
    )
    rollout.add_argument(
        "--settle-seconds",
        type=float,
        default=10.0,
        help="healthy again this long after the batch was (default: %(default)s)",
    )
    rollout.add_argument("--poll-seconds", type=float, default=1.0, help=argparse.SUPPRESS)
    rollout.set_defaults(func=cmd_provisioner_rollout)

    simulate = sub.add_parser(
        "simulate", help="devices publishing realistic BME688 readings to a customer's instance"
    )
    simulate.add_argument("--customer", required=True, help="the customer id (checked at sign-in)")
    simulate.add_argument("--email", required=True, help="the customer's sign-in email")
    simulate.add_argument(
        "--password", help="the customer's password (default: IOTISTIC_PASSWORD, else asked)"
    )
    simulate.add_argument(
        "--devices", type=int, default=3, help="devices to simulate (default: %(default)s)"
    )
    simulate.add_argument("--rate", default="1/s", help="readings per second in all, e.g. 5/s")
    simulate.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    simulate.add_argument("--url", help="the control plane (default: the running iotistic up)")
    simulate.set_defaults(func=cmd_simulate)

    contracts = sub.add_parser("contracts", help="event contracts")
    ct = contracts.add_subparsers(dest="contracts_command", required=True)
    exp = ct.add_parser("export", help="write the JSON Schemas of every event")
    exp.add_argument(
        "--out", default="contracts/schemas", help="folder to write (default: %(default)s)"
    )
    exp.set_defaults(func=cmd_contracts_export)
    _describe(parser)
    return parser


# --- environment -------------------------------------------------------------------------------


def environment(args: argparse.Namespace) -> dict[str, str]:
    """Process environment, completed with the URLs of a running ``iotistic up`` if any."""
    env = dict(os.environ)
    runtime_file = Path(args.data_dir) / RUNTIME_FILE
    if runtime_file.exists():
        published = json.loads(runtime_file.read_text())
        for key in ("DATABASE_URL", "NATS_URL", "NATS_CREDENTIALS_DIR"):
            if key not in env and key in published:
                env[key] = published[key]
    return env


def settings_from(
    args: argparse.Namespace, needs: tuple[str, ...] = ("NATS_URL", "DATABASE_URL")
) -> ServiceSettings:
    """Validated settings for an operator's command.

    The URLs it ``needs`` must be given (in the environment, or by a running ``iotistic up`` in
    the data folder): a tool that fell back to the defaults would talk to whatever Postgres
    and NATS the machine runs on the standard ports, which are not ours.
    """
    env = environment(args)
    missing = [name for name in needs if not env.get(name)]
    if missing:
        raise ConfigError(
            f"{' and '.join(missing)} not set, and no running `iotistic up` in "
            f"{Path(args.data_dir).resolve()} ({RUNTIME_FILE}): nothing to connect to; set "
            "them, or pass the platform's --data-dir"
        )
    return load_settings(ServiceSettings, env)


@contextlib.asynccontextmanager
async def event_log(settings: ServiceSettings) -> AsyncIterator[EventStore]:
    """The event log, as its operator (``NATS_CREDENTIALS_DIR``/operator), closed afterwards.

    Only ``iotistic events init`` makes or changes the stream: a tool that reads finds it or
    says that it is not there.
    """
    nc = await _operator_connection(settings)
    try:
        store = EventStore(nc.jetstream(), settings)
        try:
            await store.stream_info()
        except nats.js.errors.NotFoundError:
            raise ConfigError(
                f"the event stream {store.stream} does not exist at NATS_URL; "
                "`iotistic events init` makes it"
            ) from None
        yield store
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def connected(settings: ServiceSettings) -> AsyncIterator[tuple[EventStore, Any]]:
    """The event log (as its operator) and a database connection, closed afterwards."""
    async with event_log(settings) as store:
        conn = await asyncpg.connect(settings.database_url)
        try:
            yield store, conn
        finally:
            await conn.close()


async def _operator_connection(settings: EventLogSettings) -> Any:
    try:
        return await connect_bus(settings, OPERATOR, name="iotistic-cli")
    except BusAuthError as exc:
        raise ConfigError(f"NATS_CREDENTIALS_DIR: {exc}") from None


# --- run / up ----------------------------------------------------------------------------------


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
        provider.shutdown()


def generated_secret(data_dir: Path, name: str) -> str:
    """A secret of the embedded platform, generated at first start, readable by owner only."""
    from libs.secret_files import secret_file

    return secret_file(data_dir / "secrets" / name, nbytes=32)


def license_keys(data_dir: Path) -> Path:
    """The licensing keys of the embedded platform: a 4096-bit key made at first start."""
    from services.licensing.keys import ensure_keyring

    folder = data_dir / "keys" / "licensing"
    if not folder.exists() or not any(folder.glob("*.pem")):
        console.print("generating the license signing key (4096-bit RSA, first start only) ...")
    ensure_keyring(folder)
    return folder


def embedded_bus(data_dir: Path, settings: EventLogSettings) -> tuple[Path, str]:
    """The embedded bus's credentials (generated at first start into ``secrets/nats``, one
    password per service and the operator's) and the server's ``authorization`` block."""
    from libs.eventlog.bus_auth import Credentials, authorization_block
    from services.bus import bus_users

    credentials = Credentials(data_dir / "secrets" / "nats")
    users = bus_users(settings)
    credentials.ensure(user.name for user in users)
    hashes = credentials.hashes([user.name for user in users])
    return credentials.folder, authorization_block(users, hashes)


def running_up_pid(data_dir: Path) -> int | None:
    """The pid of the ``iotistic up`` that runs on ``data_dir`` now (by its runtime file), or
    None; a file left by one that died does not count."""
    import fcntl

    # `up` holds <data>/up.lock while it runs: when nobody holds it, the pid in the runtime
    # file is stale, even if it now names some other process with "iotistic" in its command.
    try:
        fd = os.open(data_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: an `up` runs; its pid is in the runtime file
        else:
            return None
        finally:
            os.close(fd)
    try:
        pid = int(json.loads((data_dir / RUNTIME_FILE).read_text())["pid"])
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if b"iotistic" in command else None


def cmd_up(args: argparse.Namespace) -> int:
    """``iotistic up``: the whole platform on embedded servers (services/up.py)."""
    from services import up

    return up.cmd_up(args)


# --- simulate ----------------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    """``iotistic simulate``: register devices and publish readings until told to stop."""
    import getpass

    from services.instance.simulate import devices_for, publish, session

    rate = float(str(args.rate).removesuffix("/s"))
    if rate <= 0 or args.devices < 1:
        console.print("[red]--rate and --devices must be positive[/red]")
        return 2
    url = args.url or _running_http_url(args) or "http://127.0.0.1:8080"
    password = args.password or os.environ.get("IOTISTIC_PASSWORD") or getpass.getpass()

    async def go() -> int:
        customer_id, token, instance_url = await session(url, args.email, password)
        if customer_id != args.customer:
            raise SystemExit(f"{args.email} is customer {customer_id}, not {args.customer}")
        store = Path(args.data_dir) / "simulate" / f"{customer_id}.json"
        devices = await devices_for(instance_url, token, args.devices, store)
        console.print(
            f"simulating {len(devices)} devices at {rate:g} readings/s in all; "
            f"live at {instance_url}"
        )
        return await publish(devices, rate, args.duration)

    sent = asyncio.run(go())
    console.print(f"sent {sent} readings")
    return 0


def _running_http_url(args: argparse.Namespace) -> str | None:
    runtime_file = Path(args.data_dir) / RUNTIME_FILE
    if runtime_file.exists():
        return str(json.loads(runtime_file.read_text()).get("HTTP_URL") or "") or None
    return None


# --- provisioner -------------------------------------------------------------------------------


def cmd_provisioner_render(args: argparse.Namespace) -> int:
    """``iotistic provisioner render <customer_id>``: the manifests the kubernetes backend
    applies, as YAML, made by the same backend the provisioner runs (so the same passwords,
    keys and tokens); Secrets only with ``--include-secrets``."""
    from services.provisioner.app import kubernetes_backend
    from services.provisioner.backends.base import BackendError, InstanceSpec
    from services.provisioner.backends.kubernetes.manifests.metadata import CREDENTIALS_GENERATION
    from services.provisioner.backends.kubernetes.manifests.render import render_yaml
    from services.provisioner.settings import ProvisionerSettings

    settings = load_settings(ProvisionerSettings, environment(args))
    if not settings.provisioner_secret:
        console.print("[red]PROVISIONER_SECRET is needed: the passwords derive from it[/red]")
        return 1
    if args.license_file:
        spec = InstanceSpec(
            customer_id=args.customer_id,
            plan=args.plan,
            license_jwt=Path(args.license_file).read_text().strip(),
            license_id="given",
            jwks_url=settings.license_jwks_url,
        )
    else:
        try:
            spec = asyncio.run(_current_spec(settings, args.customer_id))
        except BackendError as exc:
            raise SystemExit(str(exc)) from None
    objects = kubernetes_backend(settings).objects(spec, args.credentials_generation)
    if not args.include_secrets:
        objects = [o for o in objects if o["kind"] != "Secret"]
    for obj in objects:
        if obj["kind"] == "Namespace":
            # The generation is the provisioner's record of the customer's last rotation: this
            # output applied (GitOps, kubectl) must never set it back, or the next job applies
            # the old passwords, which the broker's admin has left behind.
            obj["metadata"].get("annotations", {}).pop(CREDENTIALS_GENERATION, None)
    sys.stdout.write(render_yaml(objects))
    return 0


def cmd_provisioner_restore_drill(args: argparse.Namespace) -> int:
    """``iotistic provisioner restore-drill <customer_id>``: a Job in the customer's namespace
    restores their newest dump into a scratch database and counts it; waits and prints how it
    went. 0 when the drill passed."""
    from services.provisioner.backups import run_restore_drill

    return _backup_job(args, "restore drill", run_restore_drill)


def cmd_provisioner_restore(args: argparse.Namespace) -> int:
    """``iotistic provisioner restore <customer_id> --yes``: a Job puts the newest intact dump
    (or ``--dump``) back over the customer's database, the instance stopped meanwhile."""
    from services.provisioner.backups import run_restore

    if not args.yes:
        console.print("this replaces the customer's data with the dump's: add --yes to go on")
        return 2
    return _backup_job(args, "restore", functools.partial(run_restore, dump=args.dump))


def _on_cluster(what: str, use: Callable[[Any], Awaitable[Any]]) -> tuple[bool, Any]:
    """``use`` with a client of the cluster (in-cluster, else the kubeconfig), closed after;
    (False, None) when the cluster refused or is away, said in one line."""
    from services.provisioner.backends.base import BackendError
    from services.provisioner.backends.kubernetes.api import cluster_client

    async def go() -> Any:
        client = await cluster_client()
        try:
            return await use(client)
        finally:
            await client.close()

    try:
        return True, asyncio.run(go())
    except BackendError as exc:
        console.print(f"[red]{what} failed:[/red] {exc}", highlight=False)
        return False, None


def _backup_job(args: argparse.Namespace, what: str, run: Callable[..., Awaitable[Any]]) -> int:
    from services.provisioner.app import kubernetes_settings
    from services.provisioner.backends.kubernetes.api import tenant_api
    from services.provisioner.settings import ProvisionerSettings

    settings = load_settings(ProvisionerSettings, environment(args))
    kube = kubernetes_settings(settings)
    ok, result = _on_cluster(
        what,
        lambda client: run(
            tenant_api(client, kube), args.customer_id, kube, timeout=args.timeout, poll=2.0
        ),
    )
    if not ok:
        return 1
    verdict = "[green]passed[/green]" if result.succeeded else "[red]FAILED[/red]"
    console.print(f"{what} {result.namespace}/{result.job}: {verdict}", soft_wrap=True)
    summary = result.summary or "(no summary: see `kubectl logs` of the Job)"
    console.print(summary, markup=False, soft_wrap=True)
    return 0 if result.succeeded else 1


def cmd_provisioner_purge(args: argparse.Namespace) -> int:
    """``iotistic provisioner purge``: delete deleted customers' namespaces past their grace
    period (the provisioner also does it every hour); idempotent."""
    from services.provisioner.backends.kubernetes.api import KubeApi
    from services.provisioner.backends.kubernetes.grace import purge_expired

    ok, purged = _on_cluster("purge", lambda client: purge_expired(KubeApi(client)))
    if not ok:
        return 1
    for name in purged:
        console.print(f"purged namespace {name}", markup=False, soft_wrap=True)
    console.print(f"{len(purged)} namespace(s) purged")
    return 0


def cmd_provisioner_rollout(args: argparse.Namespace) -> int:
    """``iotistic provisioner rollout``: update every deployed customer in gated batches."""
    from services.provisioner.backends.base import BackendError
    from services.provisioner.rollout import kubernetes_backend
    from services.provisioner.settings import ProvisionerSettings

    settings_from(args, needs=("DATABASE_URL",))  # says so when there is nothing to connect to
    settings = load_settings(ProvisionerSettings, environment(args))
    if settings.provisioner_backend != "kubernetes":
        console.print(
            "[red]rollout:[/red] works with PROVISIONER_BACKEND=kubernetes only: the local "
            "backend's instances are processes of this machine, not manifests to re-apply"
        )
        return 2
    if not settings.provisioner_secret:
        console.print("[red]rollout:[/red] PROVISIONER_SECRET is needed to render the manifests")
        return 2
    try:
        return asyncio.run(_rollout(args, settings, kubernetes_backend(settings)))
    except BackendError as exc:  # the cluster's API refused or is away: said in a line
        console.print(f"[red]rollout:[/red] {exc}")
        return 1


async def _rollout(
    args: argparse.Namespace, settings: ProvisionerSettings, backend: KubernetesBackend
) -> int:
    from libs.db.postgres import create_pool
    from services.provisioner.rollout import Rollout, RolloutBusy, plan_rollout

    # One line per customer or batch, however long, for the operator's logs and scripts.
    out = Console(soft_wrap=True)
    err = Console(stderr=True, soft_wrap=True)
    pool = await create_pool(settings.database_url, "provisioner", max_size=4)
    await backend.start()
    try:
        plan = await plan_rollout(
            pool,
            backend,
            settings,
            only=args.only,
            force=args.force,
            batch_size=args.batch_size,
            canary=args.canary,
        )
        _print_plan(out, plan, settings.instance_image)
        if plan.not_deployed:
            err.print(
                "[red]rollout:[/red] not deployed here (unknown, closed or removed): "
                + ", ".join(plan.not_deployed)
            )
            return 1
        if args.dry_run or not plan.batches:
            return 0
        rollout = Rollout(
            pool,
            backend,
            settings,
            batch_timeout=args.batch_timeout,
            settle_seconds=args.settle_seconds,
            max_failures=args.max_failures,
            poll_seconds=args.poll_seconds,
            say=out.print,
        )
        out.print(f"rollout {rollout.rollout_id}: jobs requested by {rollout.requested_by}")
        try:
            report = await rollout.run(plan)
        except RolloutBusy as exc:
            err.print(f"[red]rollout:[/red] {exc}")
            return 1
    finally:
        await backend.stop()
        await pool.close()
    out.print(
        f"rollout {report.rollout_id}: {len(report.updated)} updated, "
        f"{len(report.failures)} failed, {len(report.left)} left (closed), "
        f"{len(report.untouched)} untouched"
    )
    if report.failures:
        for failure in report.failures:
            job = f" (job {failure.job_id})" if failure.job_id else ""
            err.print(f"[red]failed:[/red] {failure.customer_id}{job}: {failure.reason}")
    if report.stopped:
        err.print(
            "[red]rollout stopped.[/red] Fix the cause and run it again: customers already "
            "updated are skipped"
        )
        return 1
    return 0


def _print_plan(out: Console, plan: RolloutPlan, image: str) -> None:
    out.print(
        f"instance image {image}: {len(plan.tenants)} to update in {len(plan.batches)} "
        f"batches, {len(plan.skipped)} already up to date"
    )
    for number, batch in enumerate(plan.batches, start=1):
        out.print(f"batch {number}: " + " ".join(f"{t.customer_id} ({t.plan})" for t in batch))
    for tenant in plan.skipped:
        out.print(f"up to date: {tenant.customer_id} ({tenant.plan})")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1")
    return value


async def _current_spec(settings: ProvisionerSettings, customer_id: str) -> InstanceSpec:
    from services.provisioner.rotation import instance_spec

    conn = await asyncpg.connect(settings.database_url)
    try:
        return await instance_spec(conn, customer_id, settings.license_jwks_url)
    finally:
        await conn.close()


def cmd_provisioner_rotate_credentials(args: argparse.Namespace) -> int:
    """``iotistic provisioner rotate-credentials <customer_id>``: the customer's next
    credentials generation, applied, and their pods ready again with it."""
    from services.provisioner.backends.base import BackendError
    from services.provisioner.rotation import rotate_credentials
    from services.provisioner.settings import ProvisionerSettings

    settings = load_settings(ProvisionerSettings, environment(args))
    if not settings.provisioner_secret:
        console.print("[red]PROVISIONER_SECRET is needed: the passwords derive from it[/red]")
        return 1

    async def progress(percent: int, step: str) -> None:
        console.print(f"{percent:3d}% {step}")

    try:
        generation = asyncio.run(rotate_credentials(settings, args.customer_id, progress))
    except BackendError as exc:
        console.print(f"[red]rotate-credentials:[/red] {exc}")
        return 1
    console.print(f"customer {args.customer_id}: credentials generation {generation}, pods ready")
    return 0


# --- replay ------------------------------------------------------------------------------------


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def cmd_replay(args: argparse.Namespace) -> int:
    """``iotistic replay <service>``: rebuild, dry-run or verify a service's read models."""
    if not args.verify and (args.max_lag is not None or args.wait is not None):
        console.print("[red]replay:[/red] --max-lag and --wait go with --verify only")
        return 2
    settings = settings_from(args)
    definition = CONTROL_PLANE[args.service]

    async def go() -> ReplayReport:
        async with connected(settings) as (store, conn):
            with Progress(
                TextColumn(f"replay {args.service}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            ) as bar:
                task = bar.add_task("events", total=None)

                def progress(seq: int, end: int) -> None:
                    bar.update(task, completed=seq, total=end)

                return await replay_service(
                    conn,
                    store,
                    schema=definition.schema,
                    migrations_package=definition.migrations_package,
                    projections=definition.projections,
                    from_seq=args.from_seq,
                    dry_run=args.dry_run,
                    verify=args.verify,
                    wait=VERIFY_WAIT_SECONDS if args.wait is None else args.wait,
                    progress=progress,
                )

    try:
        report = asyncio.run(go())
    except ReplayError as exc:
        console.print(f"[red]replay failed:[/red] {exc}")
        return 1
    max_lag = args.max_lag or 0
    failed = args.verify and bool(report.differences or report.lagging(max_lag))
    if args.json:
        print(json.dumps(_replay_json(report, args, max_lag, failed), indent=2, default=str))
    else:
        _print_replay(report, args, max_lag)
    return 1 if failed else 0


def _replay_mode(args: argparse.Namespace) -> str:
    return "verify" if args.verify else "dry run" if args.dry_run else "rebuild"


def _print_replay(report: ReplayReport, args: argparse.Namespace, max_lag: int) -> None:
    out = Console()
    out.print(
        f"{report.service} {_replay_mode(args)}: read {report.events_read} events, applied "
        f"{report.events_applied}, up to seq {report.upto_seq}"
        + (f", skipped as the live projection did: {report.skipped}" if report.skipped else "")
    )
    if not args.verify:
        if not args.dry_run:
            out.print("live read models replaced by the rebuilt ones")
        return
    out.print(f"head of the log: seq {report.head}")
    for check in report.checks:
        colour = "green" if check.lag == 0 else "red" if check.lag > max_lag else "yellow"
        out.print(
            f"  {check.projection}: checkpoint {check.checkpoint}, head {check.head}, "
            f"[{colour}]lag {check.lag} ({check.state})[/{colour}], "
            f"differences {check.differences}"
        )
    lagging = report.lagging(max_lag)
    for check in lagging:
        out.print(
            f"[red]{check.projection} is {check.lag} event(s) behind the head "
            f"(checkpoint {check.checkpoint}, head {check.head}, allowed {max_lag})"
            + (
                f": blocked at parked event seq {check.parked_at} (`iotistic parked list`)"
                if check.parked_at is not None
                else ": it did not move while verify waited"
                if not check.moved
                else ""
            )
            + "[/red]"
        )
    if report.differences == 0:
        if lagging:
            out.print(
                "no row differences at the checkpoints compared; the events after them are "
                "not in the live read models yet"
            )
        else:
            out.print("no differences: the live read models equal a clean replay of the log")
        return
    out.print(f"[red]{report.differences} difference(s):[/red]")
    for diff in report.diffs:
        for row in diff.only_live:
            out.print(f"  {diff.table}: only in live: {json.dumps(row, default=str)}")
        for row in diff.only_rebuilt:
            out.print(f"  {diff.table}: missing from live: {json.dumps(row, default=str)}")
        for live, rebuilt in diff.changed:
            columns = sorted(k for k in live if live.get(k) != rebuilt.get(k))
            changes = ", ".join(
                f"{c}: live={live.get(c)!r} replay={rebuilt.get(c)!r}" for c in columns
            )
            out.print(f"  {diff.table}: row differs: {changes}")


def _replay_json(
    report: ReplayReport, args: argparse.Namespace, max_lag: int, failed: bool
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "service": report.service,
        "mode": _replay_mode(args),
        "ok": not failed,
        "events_read": report.events_read,
        "events_applied": report.events_applied,
        "upto_seq": report.upto_seq,
        "skipped": report.skipped,
    }
    if args.verify:
        data["head"] = report.head
        data["max_lag"] = max_lag
        data["projections"] = [_check_json(c, report.diffs) for c in report.checks]
    return data


def _check_json(check: ProjectionCheck, diffs: list[TableDiff]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for diff in diffs:
        if diff.projection != check.projection:
            continue
        rows += [{"table": diff.table, "only_live": row} for row in diff.only_live]
        rows += [{"table": diff.table, "missing_from_live": row} for row in diff.only_rebuilt]
        rows += [{"table": diff.table, "live": a, "replay": b} for a, b in diff.changed]
    return {
        "projection": check.projection,
        "checkpoint": check.checkpoint,
        "head": check.head,
        "lag": check.lag,
        "state": check.state,
        "parked_at": check.parked_at,
        "differences": check.differences,
        "rows": rows,
    }


# --- events ------------------------------------------------------------------------------------


def describe(stored: StoredMessage) -> dict[str, Any]:
    """A stored message as JSON-ready data: its envelope, or why it is malformed."""
    base: dict[str, Any] = {"seq": stored.seq, "subject": stored.subject}
    try:
        envelope = decode_envelope(stored.data)
    except MalformedEvent as exc:
        return {**base, "malformed": str(exc), "raw": stored.data.decode(errors="replace")}
    del envelope  # decoded only to tell a valid envelope from a malformed one
    return {**base, "envelope": json.loads(stored.data)}


def cmd_events_tail(args: argparse.Namespace) -> int:
    """``iotistic events tail``: print events as they are appended."""
    settings = settings_from(args, needs=("NATS_URL",))
    out = Console()

    async def go() -> None:
        async with event_log(settings) as store:
            start = args.from_seq or await store.last_seq() + 1
            async for stored in store.read(from_seq=start, event_types=args.types, follow=True):
                item = describe(stored)
                if args.json:
                    print(json.dumps(item, default=str), flush=True)
                    continue
                env = item.get("envelope")
                if env is None:
                    out.print(f"{stored.seq:>8}  [red]malformed[/red] {stored.subject}")
                else:
                    out.print(
                        f"{stored.seq:>8}  {env['occurred_at']}  {env['type']:<22} "
                        f"customer={env['customer_id']}  id={env['event_id']}"
                    )

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(go())
    return 0


def cmd_events_export(args: argparse.Namespace) -> int:
    """``iotistic events export``: a range of the log as JSON lines."""
    settings = settings_from(args, needs=("NATS_URL",))

    async def go(handle: TextIO) -> int:
        count = 0
        async with event_log(settings) as store:
            async for stored in store.read(
                from_seq=args.from_seq, to_seq=args.to_seq, event_types=args.types
            ):
                handle.write(json.dumps(describe(stored), default=str) + "\n")
                count += 1
        return count

    if args.output:
        with open(args.output, "w") as handle:
            count = asyncio.run(go(handle))
    else:
        count = asyncio.run(go(sys.stdout))
    console.print(f"exported {count} events")
    return 0


def cmd_events_init(args: argparse.Namespace) -> int:
    """``iotistic events init``: make the stream (services may not), or update its settings."""
    settings = settings_from(args, needs=("NATS_URL",))

    async def go() -> Any:
        nc = await _operator_connection(settings)
        try:
            return await EventStore(nc.jetstream(), settings).ensure_stream()
        finally:
            await nc.close()

    info = asyncio.run(go())
    Console().print(
        f"stream {info.config.name}: subjects {', '.join(info.config.subjects or [])}, "
        f"{info.config.num_replicas} replica(s), {info.state.messages} events"
    )
    return 0


def cmd_bus_permissions(args: argparse.Namespace) -> int:
    """``iotistic bus permissions``: what the server lets each user do, from the declarations."""
    from services.bus import bus_users, event_owners

    settings = load_settings(EventLogSettings, environment(args))
    users = bus_users(settings)
    owners = event_owners()
    data = {
        "stream": settings.events_stream,
        "subject_prefix": settings.events_subject_prefix,
        "owners": owners,
        "users": [
            {"user": u.name, "publish": list(u.publish), "subscribe": list(u.subscribe)}
            for u in users
        ],
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    table = Table(title="event types and the one service that may append each")
    table.add_column("event type")
    table.add_column("owner")
    for event_type, owner in owners.items():
        table.add_row(event_type, owner)
    out = Console()
    out.print(table)
    for user in users:
        out.print(f"[b]{user.name}[/b] publish: {', '.join(user.publish)}")
        out.print(f"  subscribe: {', '.join(user.subscribe)}")
    return 0


def cmd_bus_config(args: argparse.Namespace) -> int:
    """``iotistic bus config``: the server's authorization block; passwords made if missing."""
    from libs.eventlog.bus_auth import Credentials, authorization_block
    from services.bus import bus_users

    settings = load_settings(EventLogSettings, environment(args))
    users = bus_users(settings)
    credentials = Credentials(Path(args.credentials_dir))
    credentials.ensure(u.name for u in users)
    block = authorization_block(users, credentials.hashes([u.name for u in users]))
    if args.out:
        out = Path(args.out)
        out.touch(mode=0o600)
        out.chmod(0o600)
        out.write_text(block)
        console.print(f"wrote {out} for {', '.join(u.name for u in users)}")
    else:
        sys.stdout.write(block)
    return 0


def cmd_events_stats(args: argparse.Namespace) -> int:
    """``iotistic events stats``: how many events of each type the log holds."""
    settings = settings_from(args, needs=("NATS_URL",))

    async def go() -> dict[str, Any]:
        async with event_log(settings) as store:
            # Stream info only: a reader (a consumer) would need the server's disk.
            first_seq, last_seq, by_subject = await store.subject_counts()
            counts: dict[str, int] = {}
            for subject, n in by_subject.items():
                event_type = StoredMessage(0, subject, b"", {}).event_type
                counts[event_type] = counts.get(event_type, 0) + n
            return {
                "stream": store.stream,
                "first_seq": first_seq,
                "last_seq": last_seq,
                "total": sum(counts.values()),
                "by_type": dict(sorted(counts.items())),
            }

    stats = asyncio.run(go())
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    table = Table(title=f"{stats['stream']}: seq {stats['first_seq']}..{stats['last_seq']}")
    table.add_column("event type")
    table.add_column("count", justify="right")
    for name, n in stats["by_type"].items():
        table.add_row(name, str(n))
    table.add_row("[b]total[/b]", f"[b]{stats['total']}[/b]")
    Console().print(table)
    return 0


# --- parked ------------------------------------------------------------------------------------


async def _service_conn(settings: ServiceSettings, schema: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        settings.database_url, server_settings={"search_path": f"{schema},public"}
    )


def cmd_parked_list(args: argparse.Namespace) -> int:
    """``iotistic parked list``: open parked events of every service."""
    settings = settings_from(args, needs=("DATABASE_URL",))

    async def go() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for name in CONTROL_PLANE:
            conn = await _service_conn(settings, name)
            try:
                exists = await conn.fetchval("SELECT to_regclass('parked_events') IS NOT NULL")
                if exists:
                    found += [{"service": name, **row} for row in await open_parked(conn)]
            finally:
                await conn.close()
        return found

    rows = asyncio.run(go())
    out = Console()
    if not rows:
        out.print("no parked events")
        return 0
    table = Table(title="parked events (the projection waits at each)")
    for column in ("service", "projection", "seq", "event_type", "error", "attempts", "decision"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            *(
                str(row.get(c) or "")
                for c in (
                    "service",
                    "projection",
                    "seq",
                    "event_type",
                    "error",
                    "attempts",
                    "decision",
                )
            )
        )
    out.print(table)
    return 0


def cmd_parked_decide(args: argparse.Namespace) -> int:
    """``iotistic parked skip|retry``: record the operator's decision."""
    settings = settings_from(args, needs=("DATABASE_URL",))

    async def go() -> bool:
        conn = await _service_conn(settings, args.service)
        try:
            return await decide(conn, args.projection, args.seq, args.decision)
        finally:
            await conn.close()

    if not asyncio.run(go()):
        console.print(f"no open parked event {args.projection}@{args.seq} in {args.service}")
        return 1
    Console().print(
        f"{args.decision}: {args.service}/{args.projection} seq {args.seq}; the running "
        "projection picks the decision up within a second"
    )
    return 0


def cmd_contracts_export(args: argparse.Namespace) -> int:
    """``iotistic contracts export``: write the JSON Schemas of every event version."""
    from contracts.schema import export_schemas

    for path in export_schemas(Path(args.out)):
        Console().print(str(path))
    return 0
