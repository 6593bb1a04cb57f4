"""The data folder of ``iotistic up``: the lock that makes one ``up`` its owner, the servers'
ports kept from one start to the next, the secrets and keys generated at first start, and
what an earlier run left running there.

Secrets set in the environment (``ADMIN_TOKEN``, ``SESSION_SECRET``, ...) are used as given;
only the missing ones are generated, once, into ``<data>/secrets``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
from collections.abc import Mapping
from pathlib import Path

import psutil

from libs.config import EventLogSettings
from libs.eventlog.bus_auth import Credentials, authorization_block
from libs.secret_files import secret_file
from libs.servers.ports import STANDARD_PORTS, kept_port
from libs.servers.process import end_processes
from services.bus import bus_users
from services.cli.environment import RUNTIME_FILE, console
from services.licensing.keys import ensure_keyring
from services.provisioner.backends.local.processes import instances_running

# Held (flock) by the `up` that runs on the data folder; the kernel releases it however `up` ends.
LOCK_FILE = "up.lock"
PORTS_FILE = "ports.json"
# Secrets taken from the environment when set there, else generated into <data>/secrets/<file>.
SECRETS = {
    "ADMIN_TOKEN": "admin-token",
    "SESSION_SECRET": "session-secret",
    "PROVISIONER_SECRET": "provisioner-secret",
    "USAGE_SECRET": "usage-secret",
    "LOGIN_RELAY_SECRET": "login-relay-secret",
    # Wraps the data keys that seal personal data: lost, every customer's is unreadable.
    "DATA_KEYS_MASTER_KEY": "data-keys-master-key",
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
            k: v for k, v in self.ports.items() if 1024 <= v <= 65535 and v not in STANDARD_PORTS
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
        if value and variable == "DATA_KEYS_MASTER_KEY" and _differs(kept, value):
            console.print(
                f"[yellow]{variable} differs from the one generated in {kept}: the personal "
                "data sealed under that key (every customer who signed up with it) cannot be "
                "opened with this one; the views fail on it instead of showing it[/yellow]"
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


def _differs(kept: Path, value: str) -> bool:
    return kept.exists() and kept.read_text().strip() != value


def generated_secret(data_dir: Path, name: str) -> str:
    """A secret of the embedded platform, generated at first start, readable by owner only."""
    return secret_file(data_dir / "secrets" / name, nbytes=32)


def license_keys(data_dir: Path) -> Path:
    """The licensing keys of the embedded platform: a 4096-bit key made at first start."""
    folder = data_dir / "keys" / "licensing"
    if not folder.exists() or not any(folder.glob("*.pem")):
        console.print("generating the license signing key (4096-bit RSA, first start only) ...")
    ensure_keyring(folder)
    return folder


def embedded_bus(data_dir: Path, settings: EventLogSettings) -> tuple[Path, str]:
    """The embedded bus's credentials (generated at first start into ``secrets/nats``, one
    password per service and the operator's) and the server's ``authorization`` block."""
    credentials = Credentials(data_dir / "secrets" / "nats")
    users = bus_users(settings)
    credentials.ensure(user.name for user in users)
    hashes = credentials.hashes([user.name for user in users])
    return credentials.folder, authorization_block(users, hashes)


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


def running_up_pid(data_dir: Path) -> int | None:
    """The pid of the ``iotistic up`` that runs on ``data_dir`` now (by its runtime file), or
    None; a file left by one that died does not count."""
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
        command = psutil.Process(pid).cmdline()
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        return None
    return pid if any("iotistic" in part for part in command) else None


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
