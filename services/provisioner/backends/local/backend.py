"""The ``local`` backend: each customer's instance as supervised processes on this machine (the
package's docstring tells what each customer gets)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import asyncpg
import httpx

from libs.observability.telemetry import trace_environment, traced_hooks
from services.provisioner.backends.base import (
    BackendError,
    Capacity,
    Deployed,
    InstanceHealth,
    InstanceSpec,
    Progress,
    derive_password,
    tightest,
)
from services.provisioner.backends.local import database, processes, readiness
from services.provisioner.backends.local.broker import ensure_broker, remove_broker
from services.provisioner.backends.local.capacity import (
    measured_connection_capacity,
    measured_memory_capacity,
)
from services.provisioner.backends.local.environment import (
    InstanceIdentity,
    instance_command,
    instance_environment,
)
from services.provisioner.backends.local.ports import port_of
from services.provisioner.backends.local.processes import (
    Supervised,
    instances_running,
    runs_with,
    terminate_pid,
)
from services.provisioner.settings import ProvisionerSettings, parse_cidrs

log = logging.getLogger(__name__)


def instance_name(customer_id: str) -> str:
    """The Postgres database, role and broker names of a customer: ``inst_<32 hex>``."""
    try:
        digits = uuid.UUID(customer_id).hex
    except ValueError:
        digits = hashlib.sha256(customer_id.encode()).hexdigest()[:32]
    return f"inst_{digits}"


class LocalBackend:
    """Runs instances as processes here, with their database and broker credentials."""

    name = "local"

    def __init__(self, settings: ProvisionerSettings, pool: Callable[[], asyncpg.Pool]) -> None:
        """``pool`` is the provisioner's, where it keeps which instances it runs."""
        self._settings = settings
        self._pool = pool
        self._secret = (settings.provisioner_secret or "").encode()
        self._dir = Path(settings.local_instances_dir).absolute()
        # Handed to every instance: refused here, at start, rather than by each instance.
        parse_cidrs(settings.alert_webhook_allowed_cidrs, "ALERT_WEBHOOK_ALLOWED_CIDRS")
        self._supervised: dict[str, Supervised] = {}
        # One HTTP client for every probe of every instance: making one costs ~60 ms of CPU
        # (its TLS context), which a health pass over hundreds of instances cannot pay each time.
        self._http: httpx.AsyncClient | None = None
        # The connection bound last measured, kept while the database does not answer.
        self._connections_bound: int | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Find the instances that should run: adopt live ones, start the others."""
        async with self._pool().acquire() as conn:
            rows = await conn.fetch("SELECT customer_id, port FROM local_instances")
        running = instances_running()
        for row in rows:
            customer_id = row["customer_id"]
            pid = running.get(customer_id)
            supervised = self._supervise(customer_id, row["port"], adopted_pid=None, start=False)
            if pid is not None and not runs_with(pid, supervised.env):
                log.warning(
                    "instance of %s (pid %d) runs with other settings than now; restarting it",
                    customer_id,
                    pid,
                )
                await terminate_pid(pid)
                pid = None
            supervised.adopted_pid = pid
            self._begin(supervised)
            log.info(
                "instance of %s: %s",
                customer_id,
                f"adopted (pid {pid})" if pid else "not running; starting it",
            )

    async def stop(self) -> None:
        """Stop every instance process this backend runs (they start again with it).

        Every instance is signalled before anything is awaited, so that even a shutdown cut
        short (a second cancellation) leaves none of them running."""
        supervised = list(self._supervised.values())
        for s in supervised:
            s.wanted = False
            if s.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(s.pid, signal.SIGTERM)
        await asyncio.gather(*(processes.stop(s) for s in supervised), return_exceptions=True)
        self._supervised.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _client(self) -> httpx.AsyncClient:
        """The client the instances are probed with (made on first use, in the event loop)."""
        if self._http is None:
            # Each probe carries the current trace (a job's "step health").
            self._http = httpx.AsyncClient(event_hooks=traced_hooks())
        return self._http

    # --- jobs -----------------------------------------------------------------------------------

    async def deploy(self, spec: InstanceSpec, progress: Progress) -> Deployed:
        """Database, broker credentials, license, process; ready when /health/ready says so."""
        name = instance_name(spec.customer_id)
        await progress(10, "database")
        database_url = await self._ensure_database(name)
        await progress(30, "broker")
        broker = await self._ensure_broker(spec.customer_id, name)
        await progress(50, "license")
        folder = self._folder(spec.customer_id)
        _write_private(folder / "license.jwt", spec.license_jwt)
        await progress(70, "instance")
        supervised = self._supervised.get(spec.customer_id)
        if spec.restart_key:
            # A redeploy replaces a broken process: a fresh one with today's settings. Stopped
            # first, so that its port is seen as it is without it.
            await self._stop_instance(spec.customer_id)
            supervised = None
        port = await self._port_of(spec.customer_id)
        if supervised is not None and supervised.port != port:
            # It could not listen on its old port (another program took it): move it.
            await self._stop_instance(spec.customer_id)
            supervised = None
        if supervised is None:
            supervised = self._supervise(
                spec.customer_id,
                port,
                adopted_pid=instances_running().get(spec.customer_id),
                database_url=database_url,
            )
        await progress(90, "health")
        try:
            await self._wait_ready(supervised, spec.license_id)
        except BackendError:
            # Start clean on the next attempt rather than keep restarting a failing instance.
            self._supervised.pop(spec.customer_id, None)
            await processes.stop(supervised)
            raise
        return Deployed(
            instance_url=self._url(port),
            components={"database": "ready", "broker": broker, "instance": "running"},
        )

    async def update(self, spec: InstanceSpec, progress: Progress) -> Deployed:
        """Write the new license and have the running instance re-read it (SIGHUP); one that
        does not answer ready is replaced instead (waiting on a hung one would only fail)."""
        supervised = self._supervised.get(spec.customer_id)
        if supervised is None or supervised.pid is None:
            return await self.deploy(spec, progress)
        if not (await self.health(spec.customer_id)).healthy:
            key = spec.restart_key or f"update:{spec.license_id}"
            return await self.deploy(dataclasses.replace(spec, restart_key=key), progress)
        await progress(30, "license")
        _write_private(self._folder(spec.customer_id) / "license.jwt", spec.license_jwt)
        await progress(60, "reload")
        await progress(90, "health")
        await self._wait_ready(supervised, spec.license_id)
        return Deployed(
            instance_url=self._url(supervised.port),
            components={"database": "ready", "broker": "ready", "instance": "running"},
        )

    async def delete(self, customer_id: str, progress: Progress, erase: bool = False) -> None:
        """Stop the process, then remove broker credentials, database, role and files, at
        once whether or not ``erase`` is asked: this machine keeps no grace period."""
        name = instance_name(customer_id)
        await progress(10, "instance")
        await self._stop_instance(customer_id)
        await progress(40, "broker")
        await remove_broker(self._settings, customer_id, name)
        await progress(70, "database")
        await database.drop_database(self._admin_url(), name)
        await progress(90, "files")
        shutil.rmtree(self._dir / name, ignore_errors=True)
        async with self._pool().acquire() as conn:
            await conn.execute("DELETE FROM local_instances WHERE customer_id = $1", customer_id)

    async def status(self, customer_id: str) -> dict[str, object]:
        """Release state and each component's state, as this machine sees them."""
        supervised = self._supervised.get(customer_id)
        if supervised is None:
            return {"release": "missing", "components": {}}
        checked, detail = await self._probe(customer_id)
        components = {
            "instance": "ready"
            if checked.healthy
            else ("not ready" if supervised.pid else "restarting"),
        }
        # What the instance says of its own database and broker connections, when it answers.
        for part in ("database", "broker"):
            check = detail.get(part)
            if isinstance(check, dict) and isinstance(check.get("ok"), bool):
                components[part] = "ready" if check["ok"] else "not ready"
        return {
            "release": "deployed" if checked.healthy else "progressing",
            "instance_url": self._url(supervised.port),
            "pid": supervised.pid,
            "restarts": supervised.restarts,
            "components": components,
            **({} if checked.healthy else {"reason": checked.reason}),
        }

    async def health(self, customer_id: str) -> InstanceHealth:
        """Ready when the instance's ``/health/ready`` answers 200 within
        ``INSTANCE_HEALTH_TIMEOUT_SECONDS``; the reason names the checks that failed."""
        checked, _ = await self._probe(customer_id)
        return checked

    async def _probe(self, customer_id: str) -> tuple[InstanceHealth, dict[str, object]]:
        """The instance's health, and the detail of its readiness answer (monitoring's)."""
        supervised = self._supervised.get(customer_id)
        if supervised is not None:
            if supervised.pid is None:
                return InstanceHealth(False, "the instance process is not running (restarting)"), {}
            port = supervised.port
        else:
            # Another provisioner on this machine may run it: ask it where it is said to be.
            async with self._pool().acquire() as conn:
                port = await conn.fetchval(
                    "SELECT port FROM local_instances WHERE customer_id = $1", customer_id
                )
            if port is None:
                return InstanceHealth(False, "no instance of it runs on this machine"), {}
        token = self._password("monitoring", customer_id)
        timeout = self._settings.instance_health_timeout_seconds
        return await readiness.probe(self._client(), self._url(port), token, timeout)

    async def capacity(self) -> Capacity:
        """The fewest of: the instances the shared Postgres has connections for, those the
        memory of this machine holds, and ``MAX_INSTANCES``."""
        s = self._settings
        return tightest(
            {
                "connections": await self._connection_capacity(),
                "memory": self._memory_capacity(),
                "setting": s.max_instances,
            }
        )

    async def _connection_capacity(self) -> int | None:
        s = self._settings
        measured = await measured_connection_capacity(
            self._admin_url(), s.local_control_plane_connections, s.local_connections_per_instance
        )
        if measured is not None:
            self._connections_bound = measured
        return self._connections_bound

    def _memory_capacity(self) -> int:
        s = self._settings
        pids = [p for p in (s.pid for s in self._supervised.values()) if p is not None]
        return measured_memory_capacity(pids, s.local_memory_share, s.local_memory_per_instance_mib)

    # --- parts ----------------------------------------------------------------------------------

    def _password(self, purpose: str, customer_id: str) -> str:
        if not self._secret:
            raise BackendError("the local backend needs PROVISIONER_SECRET to make credentials")
        return derive_password(self._secret, purpose, customer_id)

    def _client_id(self, customer_id: str) -> str:
        """The instance's broker client id: random to anyone without the secret (the
        customer id is no secret), the same on every retry."""
        return f"instance-{self._password('mqtt-client-id', customer_id)[:32]}"

    def _folder(self, customer_id: str) -> Path:
        folder = self._dir / instance_name(customer_id)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return folder

    def _url(self, port: int) -> str:
        return f"http://{self._settings.local_instance_host}:{port}"

    def _admin_url(self) -> str:
        return self._settings.local_admin_database_url or self._settings.database_url

    async def _ensure_database(self, name: str) -> str:
        return await database.ensure_database(
            self._admin_url(), name, self._password("database", name)
        )

    async def _ensure_broker(self, customer_id: str, name: str) -> str:
        password = self._password("mqtt", customer_id)
        client_id = self._client_id(customer_id)
        return await ensure_broker(self._settings, customer_id, name, password, client_id)

    async def _port_of(self, customer_id: str) -> int:
        supervised = self._supervised.get(customer_id)
        running = supervised is not None and supervised.pid is not None
        host = self._settings.local_instance_host
        return await port_of(self._pool(), host, customer_id, running)

    def _environment(self, customer_id: str, port: int, database_url: str | None) -> dict[str, str]:
        name = instance_name(customer_id)
        who = InstanceIdentity(
            customer_id=customer_id,
            name=name,
            database_url=database_url,
            mqtt_password=self._password("mqtt", customer_id),
            mqtt_client_id=self._client_id(customer_id),
            monitoring_token=self._password("monitoring", customer_id),
        )
        return instance_environment(self._settings, who, port, self._dir / name / "license.jwt")

    def _supervise(
        self,
        customer_id: str,
        port: int,
        adopted_pid: int | None,
        database_url: str | None = None,
        start: bool = True,
    ) -> Supervised:
        if database_url is None:
            database_url = self._database_url_of(customer_id)
        supervised = Supervised(
            customer_id=customer_id,
            port=port,
            command=instance_command(self._settings),
            env=self._environment(customer_id, port, database_url),
            log_path=self._folder(customer_id) / "instance.log",
            adopted_pid=adopted_pid,
        )
        if start:
            self._begin(supervised)
        return supervised

    def _begin(self, supervised: Supervised) -> None:
        # The span current now (a deploy's step) is the parent of the instance's first start.
        supervised.trace = trace_environment()
        supervised.task = asyncio.create_task(
            processes.keep_running(supervised), name=f"instance {supervised.customer_id}"
        )
        self._supervised[supervised.customer_id] = supervised

    def _database_url_of(self, customer_id: str) -> str:
        name = instance_name(customer_id)
        return database.database_url(self._admin_url(), name, self._password("database", name))

    async def _stop_instance(self, customer_id: str) -> None:
        """Stop the customer's process: the one kept running, and any stray one left here."""
        supervised = self._supervised.pop(customer_id, None)
        if supervised is not None:
            await processes.stop(supervised)
        stray = instances_running().get(customer_id)
        if stray is not None:
            await terminate_pid(stray)

    async def _wait_ready(self, s: Supervised, license_id: str) -> None:
        await readiness.wait_ready(
            self._client(),
            s,
            self._url(s.port),
            self._password("monitoring", s.customer_id),
            license_id,
            self._settings.local_ready_timeout_seconds,
        )


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only, whole or not at all."""
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    temporary.replace(path)
