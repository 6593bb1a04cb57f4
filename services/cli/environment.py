"""What an operator's command runs with: the process environment, completed by the URLs a
running ``iotistic up`` publishes in its data folder, the settings validated from it, and the
terminal (standard error) where commands say what they do."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rich.console import Console

from libs.config import ConfigError, ServiceSettings, load_settings

console = Console(stderr=True)

# Written by a running `iotistic up` into its data folder: its URLs and pids.
RUNTIME_FILE = "runtime.json"


def environment(args: argparse.Namespace) -> dict[str, str]:
    """Process environment, completed with the URLs of a running ``iotistic up`` if any."""
    env = dict(os.environ)
    runtime_file = Path(args.data_dir) / RUNTIME_FILE
    if runtime_file.exists():
        published = json.loads(runtime_file.read_text())
        for key in ("DATABASE_URL", "NATS_URL", "NATS_CREDENTIALS_DIR"):
            if key not in env and key in published:
                env[key] = published[key]
    # The master key that opens sealed personal data (a replay rebuilds views from it), as
    # `iotistic up` generated it, unless given.
    master = Path(args.data_dir) / "secrets" / "data-keys-master-key"
    if not env.get("DATA_KEYS_MASTER_KEY") and master.is_file():
        env["DATA_KEYS_MASTER_KEY"] = master.read_text().strip()
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


def running_http_url(args: argparse.Namespace) -> str | None:
    """The HTTP URL of the ``iotistic up`` running on the data folder, if it published one."""
    runtime_file = Path(args.data_dir) / RUNTIME_FILE
    if runtime_file.exists():
        return str(json.loads(runtime_file.read_text()).get("HTTP_URL") or "") or None
    return None
