"""``iotistic up``: the whole platform on one machine, over one data folder, owning its servers.

What ``up`` starts ends with it, however it ends: Ctrl-C stops Mosquitto, NATS and Postgres
in that order; a kill -9 of ``up`` has the kernel stop them and the instances (their
parent-death signal). What an earlier run could not stop is found by its data folder and
stopped before anything starts over that data. The servers' ports are kept in
``<data>/ports.json`` and taken again at the next start when they are free, so everything is
where it was; while ``up`` runs, a server that dies is started again on the same port
(``ServerKeeper``), and ``/health/ready`` shows it down meanwhile.

The work is in ``up_platform`` (the servers and the services) and ``data_folder`` (the lock,
ports, secrets and keys), imported when ``up`` runs: every other command would pay for them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from services.cli.environment import console


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``up``'s arguments."""
    up = subparsers.add_parser(
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


def cmd_up(args: argparse.Namespace) -> int:
    """``iotistic up``: embedded Postgres, NATS and Mosquitto, then target all."""
    from libs.servers.process import EmbeddedServerError
    from services.cli.up_platform import bring_up

    data_dir = Path(args.data_dir).resolve()
    try:
        return bring_up(data_dir, args.host, args.port)
    except EmbeddedServerError as exc:
        console.print(f"[red]iotistic up could not start:[/red] {exc}")
        return 1
