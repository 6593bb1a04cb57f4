"""A real Mosquitto broker run as a child process, with dynamic security, for ``iotistic up``
and the tests.

Mosquitto is the machine's (Debian's ``mosquitto`` package: the broker, ``mosquitto_ctrl`` and
the dynamic-security plugin). The broker listens for MQTT and MQTT over WebSockets on ports of
its own, refuses anonymous clients and packets over 64 KiB, bounds what it queues per client,
and keeps its clients, roles and ACLs in ``<data_dir>/dynamic-security.json``, administered
over MQTT by the admin whose password is generated at first start into
``<data_dir>/admin-password`` (mode 0600).
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import psutil

from libs.secret_files import secret_file
from libs.servers.ports import free_port
from libs.servers.process import (
    START_TIMEOUT,
    ChildServer,
    EmbeddedServerError,
    open_log,
    processes_matching,
)

ADMIN_USER = "iotistic-admin"
# MQTT 3.1.1 CONNECT: protocol "MQTT" level 4, clean session, keep-alive 10 s, client id
# "iotistic-probe", no credentials. The broker answers it with a CONNACK refusing the client.
_PROBE_ID = b"iotistic-probe"
_ANONYMOUS_CONNECT = (
    bytes([0x10, 12 + len(_PROBE_ID)])
    + b"\x00\x04MQTT\x04\x02\x00\x0a"
    + len(_PROBE_ID).to_bytes(2, "big")
    + _PROBE_ID
)
PLUGIN_GLOBS = (
    "/usr/lib/*/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/usr/lib/*/mosquitto/mosquitto_dynamic_security.so",
)
INSTALL_HINT = "install Debian's mosquitto package: apt-get install mosquitto"
# A reading is at most 4 KiB and a dynamic-security command a few hundred bytes: 64 KiB leaves
# room for both. A larger PUBLISH (indeed any larger packet) ends the client's connection as
# soon as its header arrives, so the broker never holds it; nothing is acknowledged.
MESSAGE_SIZE_LIMIT = 64 * 1024
# What the broker holds for one client that is away or behind (the instance while its
# database is down): about 200,000 readings of a typical 300 bytes, whichever limit comes first.
MAX_QUEUED_MESSAGES = 200_000
MAX_QUEUED_BYTES = 64 * 1024 * 1024
# Connections per listener: far above what the devices of the customers one broker serves
# open, and below the file descriptors a broker process gets (commonly 20,000 or more).
MAX_CONNECTIONS = 10_000


def listener_limits() -> list[str]:
    """What each listener takes at most (``mosquitto.conf`` lines, after a ``listener`` line):
    connections beyond it are refused, so connections that never finish their CONNECT cannot
    use up the broker's file descriptors and take every tenant's devices down with it."""
    return [f"max_connections {MAX_CONNECTIONS}"]


def broker_limits() -> list[str]:
    """The size and queue limits every broker of the platform runs with (``mosquitto.conf``
    lines), embedded or in Kubernetes."""
    return [
        f"message_size_limit {MESSAGE_SIZE_LIMIT}",
        f"max_packet_size {MESSAGE_SIZE_LIMIT}",
        # A subscriber that falls behind (ingest during a burst) must not lose QoS 1
        # messages: Mosquitto's default queue of 1000 per client drops the rest.
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        f"max_queued_bytes {MAX_QUEUED_BYTES}",
    ]


@functools.cache
def mosquitto_binaries() -> tuple[Path, Path, Path]:
    """The broker, ``mosquitto_ctrl`` and the dynamic-security plugin, or a clear error."""
    broker = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    ctrl = shutil.which("mosquitto_ctrl")
    plugins = [p for pattern in PLUGIN_GLOBS for p in sorted(glob.glob(pattern))]
    if not broker or not ctrl or not plugins:
        missing = [n for n, v in (("mosquitto", broker), ("mosquitto_ctrl", ctrl)) if not v]
        if not plugins:
            missing.append("mosquitto_dynamic_security.so")
        raise EmbeddedServerError(f"Mosquitto not found ({', '.join(missing)}): {INSTALL_HINT}")
    return Path(broker), Path(ctrl), Path(plugins[0])


class EmbeddedMosquitto(ChildServer):
    """Mosquitto with dynamic security on free ports, over a data folder."""

    name = "mosquitto"

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        ws_port: int | None = None,
        host: str = "127.0.0.1",
        websockets: bool = False,
    ) -> None:
        """Ports are fixed here, so a restart comes back on the same ones. ``websockets`` adds
        an MQTT-over-WebSockets listener: off by default, because Mosquitto 2.0 binds it to
        every interface whatever host it is given."""
        self.data_dir = Path(data_dir).absolute()
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        super().__init__(self.data_dir / "mosquitto.log")
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.ws_port = ws_port if ws_port is not None else free_port(host)
        self.websockets = websockets
        self.admin_username = ADMIN_USER

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the MQTT listener."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """``ws://host:port`` of the MQTT-over-WebSockets listener."""
        return f"ws://{self.host}:{self.ws_port}"

    @property
    def dynsec_file(self) -> Path:
        """Where the broker keeps its clients, roles and ACLs."""
        return self.data_dir / "dynamic-security.json"

    @property
    def admin_password(self) -> str:
        """The dynamic-security admin's password, generated at first use (file, mode 0600)."""
        return secret_file(self.data_dir / "admin-password")

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Write the configuration, create the admin at first start, start and wait."""
        if self.is_running:
            return
        self._forget_dead_server()
        self.clear_leftovers()
        broker, ctrl, plugin = mosquitto_binaries()
        if not self.dynsec_file.exists():
            self._init_dynsec(ctrl)
        self.config_path.write_text(self._config(plugin))
        with open_log(self.log_path) as log_file:
            self._spawn([str(broker), "-c", str(self.config_path)], log_file)
        self._wait_ready(timeout)

    @property
    def config_path(self) -> Path:
        """Where the broker's configuration is written at every start."""
        return self.data_dir / "mosquitto.conf"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then kill after ``timeout``; idempotent."""
        self._stop(self.stop_signal, timeout)

    def answers(self) -> bool:
        """An MQTT CONNECT without credentials gets its CONNACK (a refusal) within 3 s."""
        try:
            with socket.create_connection((self.host, self.port), timeout=3) as sock:
                sock.sendall(_ANONYMOUS_CONNECT)
                return sock.recv(4)[:1] == b"\x20"  # CONNACK
        except OSError:
            return False

    def leftovers(self) -> list[psutil.Process]:
        """Mosquitto processes running on this configuration file."""
        return processes_matching(lambda proc: str(self.config_path) in proc.cmdline())

    def _init_dynsec(self, ctrl: Path) -> None:
        result = subprocess.run(
            [str(ctrl), "dynsec", "init", str(self.dynsec_file), ADMIN_USER, self.admin_password],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0 or not self.dynsec_file.exists():
            raise EmbeddedServerError(f"mosquitto_ctrl dynsec init failed: {result.stderr.strip()}")
        self.dynsec_file.chmod(0o600)

    def _config(self, plugin: Path) -> str:
        lines = [
            "# Written by iotistic at every start; edits are lost.",
            "per_listener_settings false",
            "allow_anonymous false",
            "persistence false",
            *broker_limits(),
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            f"listener {self.port} {self.host}",
            *listener_limits(),
        ]
        if self.websockets:
            lines += [f"listener {self.ws_port} {self.host}", "protocol websockets"]
            lines += listener_limits()
        lines += [
            f"plugin {plugin}",
            f"plugin_opt_config_file {self.dynsec_file}",
        ]
        if os.geteuid() == 0:
            # As root Mosquitto would switch to the `mosquitto` account, which cannot reach a
            # data folder inside root's private temporary folders; it listens on loopback only.
            lines.append("user root")
        return "\n".join(lines) + "\n"

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.02)
        raise self._fail(f"not listening on {self.host}:{self.port} after {timeout:.0f} s")
