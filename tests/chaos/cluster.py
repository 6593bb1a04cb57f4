"""The platform under test: its servers and its processes, started and faulted on command.

One ``Cluster`` per experiment, in a folder of its own, on free ports: embedded Postgres,
NATS JetStream (with a bus user per service, as ``iotistic up`` makes them), Mosquitto, and
the control plane as ``iotistic run --target all`` (the shape of ``./dev up``) or one
``iotistic run --target X`` process per service (the shape of production). The provisioner
runs the local backend, so every signup really starts an instance process.

A process supervisor (systemd, Kubernetes) is what restarts a killed service in production;
here the experiment does it, by starting the same command on the same port again.

Settings an operator would choose for a load test from one address, and no more: the signup
and login limits raised (every request comes from 127.0.0.1), the deployment queue's first
retry after 2 s instead of 60 s and job leases of 10 s instead of 30 s, so that a job a fault
broke is retried within the bounded time an experiment waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from libs.config import EventLogSettings, load_settings
from libs.servers.keeper import NatsWatchdog
from libs.servers.mosquitto import EmbeddedMosquitto
from libs.servers.nats import EmbeddedNats
from libs.servers.ports import free_port
from libs.servers.postgres import EmbeddedPostgres
from services.provisioner.backends.local.backend import instance_name
from services.provisioner.backends.local.processes import MARKER

IOTISTIC = str(Path(sys.executable).parent / "iotistic")
SERVICES = ("signup", "licensing", "billing", "provisioner")
# What the processes we start inherit from ours; never the URLs of the machine's own servers.
INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "VIRTUAL_ENV", "PYTHONPATH", "TMPDIR")
READY_TIMEOUT = 90.0
STOP_TIMEOUT = 20.0
COMMAND_TIMEOUT = 120.0


class ClusterError(RuntimeError):
    """The platform could not be started or reached."""


@dataclass
class Service:
    """One ``iotistic run --target <target>`` process on a fixed port."""

    target: str
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Probe:
    """One reading of a process's ``/health/ready``: 200, 503, ``down`` or ``timeout``."""

    at: float
    name: str
    status: str


@dataclass
class Cluster:
    """The servers and processes of one experiment, in ``root``."""

    root: Path
    separated: bool = False
    relay_broker: bool = False
    nats_disk_bytes: int | None = None
    keep: bool = False
    services: dict[str, Service] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    mounted: Path | None = None

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        self.postgres = EmbeddedPostgres(self.root / "postgres")
        self.nats: EmbeddedNats | None = None
        self.mosquitto = EmbeddedMosquitto(self.root / "mosquitto")
        self.relay: object | None = None
        self.nats_stopped = False
        self.watchdog: asyncio.Task[None] | None = None

    # --- start ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Every server and process, each ready, or ``ClusterError``."""
        from services.cli.data_folder import embedded_bus
        from services.licensing.keys import generate_key

        base = {k: os.environ[k] for k in INHERITED if k in os.environ}
        nats_dir = self.root / "nats"
        if self.nats_disk_bytes is not None:
            self.mount_small_disk(nats_dir, self.nats_disk_bytes)
        bus_folder, authorization = embedded_bus(self.root, load_settings(EventLogSettings, {}))
        self.nats = EmbeddedNats(nats_dir, authorization=authorization)
        keys = self.root / "keys" / "licensing"
        await asyncio.to_thread(generate_key, keys, 2048)
        await asyncio.to_thread(self.postgres.start)
        await asyncio.to_thread(self.nats.start)
        # What `iotistic up` does for its embedded NATS (a supervisor's liveness probe does it
        # for a NATS pod): restart it when JetStream stays stuck on a write error.
        self.watchdog = asyncio.create_task(NatsWatchdog(self.nats, after=10.0).run())
        await asyncio.to_thread(self.mosquitto.start)
        mqtt_port = self.mosquitto.port
        if self.relay_broker:
            from tests.tcp_relay import TcpRelay

            relay = TcpRelay(self.mosquitto.url)
            await relay.__aenter__()
            self.relay = relay
            mqtt_port = relay.port
        names = SERVICES if self.separated else ("all",)
        for name in names:
            self.services[name] = Service(name, free_port(), self.root / "logs" / f"{name}.log")
        self.env = {
            **base,
            "DATABASE_URL": await asyncio.to_thread(self.postgres.create_database, "iotistic"),
            "NATS_URL": self.nats.url,
            "NATS_CREDENTIALS_DIR": str(bus_folder),
            "HTTP_HOST": "127.0.0.1",
            "LOG_LEVEL": "WARNING",
            "ADMIN_TOKEN": secrets.token_urlsafe(32),
            "SESSION_SECRET": secrets.token_urlsafe(32),
            "PROVISIONER_SECRET": secrets.token_urlsafe(32),
            "USAGE_SECRET": secrets.token_urlsafe(32),
            "LOGIN_RELAY_SECRET": secrets.token_urlsafe(32),
            "DATA_KEYS_MASTER_KEY": secrets.token_urlsafe(32),
            "LICENSE_KEYS_DIR": str(keys),
            "PROVISIONER_BACKEND": "local",
            "LOCAL_INSTANCES_DIR": str(self.root / "instances"),
            "LICENSE_JWKS_URL": f"{self.url_of('licensing')}/.well-known/jwks.json",
            "CONTROL_PLANE_URL": self.public_url,
            "MQTT_HOST": self.mosquitto.host,
            "MQTT_PORT": str(mqtt_port),
            "MQTT_ADMIN_USERNAME": self.mosquitto.admin_username,
            "MQTT_ADMIN_PASSWORD": self.mosquitto.admin_password,
            "SIGNUP_MAX_PER_ADDRESS": "100000",
            "SIGNUP_MAX_PER_HOUR": "100000",
            "LOGIN_MAX_FAILURES_PER_EMAIL": "100000",
            "LOGIN_MAX_FAILURES_PER_ADDRESS": "100000",
            "QUEUE_RETRY_DELAY": "2000",
            "QUEUE_LEASE_SECONDS": "10",
        }
        code, out = await self.command("events", "init")
        if code != 0:
            raise ClusterError(f"iotistic events init failed: {out}")
        for service in self.services.values():
            self.spawn(service)
        await asyncio.gather(*(self.wait_ready(s.target) for s in self.services.values()))

    def mount_small_disk(self, folder: Path, size: int) -> None:
        """A tmpfs of ``size`` bytes at ``folder`` (we are root), or a loop-mounted image."""
        folder.mkdir(parents=True, exist_ok=True)
        tried = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if tried.returncode != 0:
            image = self.root / "nats-disk.img"
            with image.open("wb") as handle:
                handle.truncate(size)
            steps = [
                ["mkfs.ext4", "-q", "-F", str(image)],
                ["mount", "-o", "loop", str(image), str(folder)],
            ]
            for step in steps:
                result = subprocess.run(
                    step, capture_output=True, text=True, timeout=60, check=False
                )
                if result.returncode != 0:
                    raise ClusterError(
                        f"cannot make a small disk for NATS: tmpfs said {tried.stderr.strip()!r}, "
                        f"{step[0]} said {result.stderr.strip()!r}"
                    )
        self.mounted = folder

    # --- processes -----------------------------------------------------------------------------

    @property
    def public_url(self) -> str:
        """Where customers sign up and log in."""
        return self.url_of("signup")

    def url_of(self, service: str) -> str:
        """The HTTP address of the process hosting ``service``."""
        if self.separated:
            return self.services[service].url
        return self.services["all"].url

    def spawn(self, service: Service) -> None:
        """Start (or start again, as a supervisor would) the service's process."""
        with service.log_path.open("ab") as log:
            service.process = subprocess.Popen(
                [IOTISTIC, "run", "--target", service.target, "--port", str(service.port)],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        service.starts += 1

    def kill(self, name: str) -> None:
        """kill -9 of the service's process."""
        service = self.services[name]
        if service.process is not None and service.process.poll() is None:
            service.process.send_signal(signal.SIGKILL)
            service.process.wait(timeout=30)

    async def wait_ready(self, name: str, timeout: float = READY_TIMEOUT) -> float:
        """Seconds until the process answers ``/health/ready`` 200, or ``ClusterError``."""
        service = self.services[name]
        started = time.monotonic()
        last = ""
        async with httpx.AsyncClient(timeout=3) as client:
            while time.monotonic() - started < timeout:
                if service.process is not None and service.process.poll() is not None:
                    raise ClusterError(
                        f"{name} exited with {service.process.returncode}; see {service.log_path}"
                    )
                last = await probe_ready(client, service.url)
                if last == "200":
                    return time.monotonic() - started
                await asyncio.sleep(0.25)
        raise ClusterError(f"{name} not ready after {timeout:.0f} s (last: {last})")

    async def command(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> tuple[int, str]:
        """Run ``iotistic <args>`` as the operator would, against this cluster."""
        process = await asyncio.create_subprocess_exec(
            IOTISTIC,
            *args,
            env={**self.env, "COLUMNS": "200", "NO_COLOR": "1"},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out, _ = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            return -1, f"iotistic {' '.join(args)} timed out after {timeout:.0f} s"
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        return process.returncode or 0, out.decode(errors="replace")

    def instances(self) -> dict[str, int]:
        """Customer id → pid of the instance processes of this cluster (and no other)."""
        return _instances_under(self.root / "instances")

    def instance_database_url(self, customer_id: str) -> str:
        return self.postgres.url_for(instance_name(customer_id))

    # --- servers -------------------------------------------------------------------------------

    def stop_nats(self) -> None:
        assert self.nats is not None and self.nats.pid is not None
        os.kill(self.nats.pid, signal.SIGSTOP)
        self.nats_stopped = True

    def continue_nats(self) -> None:
        if self.nats is not None and self.nats.pid is not None and self.nats_stopped:
            os.kill(self.nats.pid, signal.SIGCONT)
        self.nats_stopped = False

    # --- clean-up ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop everything started here, remove the folder (unless kept); never raises."""
        if self.watchdog is not None:
            self.watchdog.cancel()
            await asyncio.gather(self.watchdog, return_exceptions=True)
        self.continue_nats()
        for service in self.services.values():
            if service.running:
                assert service.process is not None
                service.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for service in self.services.values():
            if service.process is None:
                continue
            try:
                service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait(timeout=10)
        # A provisioner stopped gracefully stops its instances; one killed leaves them.
        for pid in self.instances().values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        relay = self.relay
        if relay is not None:
            with contextlib.suppress(Exception):
                await relay.__aexit__(None, None, None)  # type: ignore[attr-defined]
        for server in (self.mosquitto, self.nats, self.postgres):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
        if self.mounted is not None:
            result = subprocess.run(
                ["umount", str(self.mounted)], capture_output=True, timeout=30, check=False
            )
            if result.returncode != 0:
                subprocess.run(["umount", "-l", str(self.mounted)], timeout=30, check=False)
            self.mounted = None
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


async def probe_ready(client: httpx.AsyncClient, url: str, timeout: float = 2.0) -> str:
    """``/health/ready`` of ``url``: its status code, ``down`` or ``timeout``."""
    try:
        response = await client.get(f"{url}/health/ready", timeout=timeout)
    except httpx.TimeoutException:
        return "timeout"
    except httpx.TransportError:
        return "down"
    return str(response.status_code)


def _instances_under(folder: Path) -> dict[str, int]:
    """Instance processes whose license file is in ``folder`` (so started for this cluster)."""
    marker = f"{MARKER}=".encode()
    license_prefix = f"LICENSE_FILE={folder}/".encode()
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if not any(item.startswith(license_prefix) for item in environ):
            continue
        customer = next((i[len(marker) :] for i in environ if i.startswith(marker)), None)
        # The instance leads its own session; its children (if any) are in it.
        fields = stat.rsplit(")", 1)[-1].split()
        if customer is not None and fields[0] not in ("Z", "X") and fields[3] == entry.name:
            found[customer.decode()] = int(entry.name)
    return found
