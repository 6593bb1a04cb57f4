"""``iotistic bus``: who may publish and consume what on the event bus, from the services'
declarations, and the nats-server ``authorization`` block that enforces it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from libs.config import EventLogSettings, load_settings
from libs.eventlog.bus_auth import Credentials, authorization_block
from services.bus import bus_users, event_owners
from services.cli.environment import console, environment


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``bus``' commands and their arguments."""
    bus = subparsers.add_parser("bus", help="who may publish and consume what on the event bus")
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


def cmd_bus_permissions(args: argparse.Namespace) -> int:
    """``iotistic bus permissions``: what the server lets each user do, from the declarations."""
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
