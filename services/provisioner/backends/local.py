"""The ``local`` backend: each customer's instance as supervised processes on this machine.

Per customer: a database and a role of its own in the shared Postgres (the role may connect to
no other database), a role and a client of its own on the shared Mosquitto (dynamic security,
bound to a client id of its own), a folder with its license file and log, and an instance
process (``python -m services.instance``, which is ``iotistic run --target instance`` without
the rest of the command) on a port of its own, restarted if it dies. The
passwords, the broker client id and the instance's monitoring token are derived from
``PROVISIONER_SECRET`` (HMAC), so a retried job converges on the same ones and nothing secret
is stored. An instance ends with the provisioner that started it (its parent-death signal),
so nothing outlives ``iotistic up``. Should one still be running when the provisioner starts
(it outlived a provisioner of an earlier version, say), it is found by the marker in its
environment and kept only if it runs with exactly the settings it would be given now; else it
is stopped and started again with them, so instances follow the platform's addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import shutil
import signal
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import httpx
import psutil

from contracts.credentials import instance_usage_token, login_relay_key
from libs.db.postgres import CONNECTION_ERRORS
from libs.mqtt.dynsec import DynSec, DynSecError, subtree_acls
from libs.servers.ports import free_port, port_is_free
from libs.servers.process import end_with_parent
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
from services.provisioner.settings import ProvisionerSettings, parse_cidrs

log = logging.getLogger(__name__)

MARKER = "IOTISTIC_INSTANCE_OF"
# What an instance inherits from the provisioner's environment; nothing else (no secrets).
INHERITED = ("PATH", "LANG", "LC_ALL", "TZ", "HOME", "VIRTUAL_ENV", "PYTHONPATH", "TMPDIR")
RESTART_BACKOFF_MAX = 30.0
# Connections an instance's database role may hold at once (its pool is 6).
INSTANCE_ROLE_CONNECTIONS = 12
STABLE_AFTER = 60.0
MIB = 1024 * 1024


def instance_name(customer_id: str) -> str:
    """The Postgres database, role and broker names of a customer: ``inst_<32 hex>``."""
    try:
        digits = uuid.UUID(customer_id).hex
    except ValueError:
        digits = hashlib.sha256(customer_id.encode()).hexdigest()[:32]
    return f"inst_{digits}"


def topic_root(customer_id: str) -> str:
    """Every MQTT topic of the customer is under ``<customer_id>/`` (devices publish to
    ``<customer_id>/devices/<device_id>/readings`` and ``.../status``)."""
    return customer_id


@dataclass
class Supervised:
    """One instance process and the task that keeps it running."""

    customer_id: str
    port: int
    command: list[str]
    env: dict[str, str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    adopted_pid: int | None = None
    restarts: int = 0
    wanted: bool = True
    task: asyncio.Task[None] | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int | None:
        """The running process's id, if any."""
        if self.process is not None and self.process.returncode is None:
            return self.process.pid
        return self.adopted_pid


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
            if pid is not None and not _runs_with(pid, supervised.env):
                log.warning(
                    "instance of %s (pid %d) runs with other settings than now; restarting it",
                    customer_id,
                    pid,
                )
                await _terminate_pid(pid)
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
        await asyncio.gather(*(self._stop_process(s) for s in supervised), return_exceptions=True)
        self._supervised.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _client(self) -> httpx.AsyncClient:
        """The client the instances are probed with (made on first use, in the event loop)."""
        if self._http is None:
            self._http = httpx.AsyncClient()
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
            await self._stop_process(supervised)
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
        await self._remove_broker(customer_id, name)
        await progress(70, "database")
        await self._drop_database(name)
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
        try:
            answer = await self._client().get(
                f"{self._url(port)}/health/ready",
                headers={"Authorization": f"Bearer {token}"},
                timeout=self._settings.instance_health_timeout_seconds,
            )
        except httpx.HTTPError as exc:
            return InstanceHealth(False, f"not answering: {type(exc).__name__}"), {}
        try:
            detail = answer.json()
        except ValueError:
            detail = None
        detail = detail if isinstance(detail, dict) else {}
        if answer.status_code == 200:
            return InstanceHealth(True), detail
        failed = [
            str(name)[:40]
            for name, check in detail.items()
            if isinstance(check, dict) and check.get("ok") is False
        ]
        reason = f"not ready ({answer.status_code}): {', '.join(failed[:10]) or 'no detail'}"
        return InstanceHealth(False, reason), detail

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
        try:
            conn = await asyncpg.connect(self._admin_url(), timeout=5)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            log.warning("capacity: database not reachable (%s); last bound kept", exc)
            return self._connections_bound
        try:
            limits = await conn.fetchrow(
                "SELECT current_setting('max_connections')::int AS max_connections, "
                "current_setting('superuser_reserved_connections')::int AS superusers, "
                # Postgres 16 keeps these for roles granted pg_use_reserved_connections.
                "coalesce(current_setting('reserved_connections', true), '0')::int AS reserved"
            )
        except asyncpg.PostgresError as exc:
            log.warning("capacity: reading max_connections failed (%s)", exc.sqlstate)
            return self._connections_bound
        finally:
            await conn.close()
        self._connections_bound = connection_capacity(
            limits["max_connections"],
            limits["superusers"] + limits["reserved"],
            s.local_control_plane_connections,
            s.local_connections_per_instance,
        )
        return self._connections_bound

    def _memory_capacity(self) -> int:
        s = self._settings
        held = 0
        for supervised in self._supervised.values():
            pid = supervised.pid
            if pid is not None:
                with contextlib.suppress(psutil.Error):
                    held += psutil.Process(pid).memory_info().rss
        return memory_capacity(
            psutil.virtual_memory().available,
            held,
            s.local_memory_share,
            s.local_memory_per_instance_mib * MIB,
        )

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
        password = self._password("database", name)
        try:
            conn = await asyncpg.connect(self._admin_url())
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise BackendError(f"database server not reachable: {type(exc).__name__}") from None
        try:
            # One deploy's database at a time, from creation to confinement: a database made
            # meanwhile by another deploy lets every role connect until its own REVOKE, and
            # would fail this deploy's check that its role can connect nowhere else.
            await conn.execute("SELECT pg_advisory_lock($1)", DATABASE_ACL_LOCK)
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name)
            # Set again on every deploy: the password follows PROVISIONER_SECRET if it changed.
            await conn.execute(
                await conn.fetchval(
                    "SELECT format('%s ROLE %I LOGIN PASSWORD %L', $3::text, $1::text, $2::text)",
                    name,
                    password,
                    "ALTER" if exists else "CREATE",
                )
            )
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                await conn.execute(
                    await conn.fetchval(
                        "SELECT format('CREATE DATABASE %I OWNER %I', $1::text, $1::text)", name
                    )
                )
            # An instance holds a pool of 6 and a connection or two besides; a role holding
            # more (its password in a tenant's hands) would take the shared server's slots.
            await conn.execute(
                await conn.fetchval(
                    "SELECT format('ALTER ROLE %I CONNECTION LIMIT %s', $1::text, $2::int)",
                    name,
                    INSTANCE_ROLE_CONNECTIONS,
                )
            )
            # Nobody but the owner may connect to a customer's database (in _confine_role).
            await _confine_role(conn, name)
        except asyncpg.PostgresError as exc:
            raise BackendError(f"creating the database failed: {exc.sqlstate}") from None
        finally:
            await conn.close()
        parts = urlsplit(self._admin_url())
        host = parts.hostname or "127.0.0.1"
        netloc = f"{name}:{quote(password)}@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, f"/{name}", parts.query, ""))

    async def _drop_database(self, name: str) -> None:
        try:
            conn = await asyncpg.connect(self._admin_url())
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            raise BackendError(f"database server not reachable: {type(exc).__name__}") from None
        try:
            for statement in (
                "SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE)', $1::text)",
                "SELECT format('DROP ROLE IF EXISTS %I', $1::text)",
            ):
                await conn.execute(await conn.fetchval(statement, name))
        except asyncpg.PostgresError as exc:
            raise BackendError(f"dropping the database failed: {exc.sqlstate}") from None
        finally:
            await conn.close()

    def _dynsec(self) -> DynSec | None:
        s = self._settings
        if not s.mqtt_admin_username or not s.mqtt_admin_password:
            return None
        return DynSec(s.mqtt_host, s.mqtt_port, s.mqtt_admin_username, s.mqtt_admin_password)

    async def _ensure_broker(self, customer_id: str, name: str) -> str:
        dynsec = self._dynsec()
        if dynsec is None:
            return "not configured"
        acls = subtree_acls(topic_root(customer_id))
        try:
            async with dynsec:
                await dynsec.ensure_role(name, acls)
                await dynsec.ensure_client(
                    name,
                    self._password("mqtt", customer_id),
                    [name],
                    textname=customer_id,
                    clientid=self._client_id(customer_id),
                )
        except (DynSecError, OSError) as exc:
            raise BackendError(f"broker credentials failed: {exc}") from None
        return "ready"

    async def _remove_broker(self, customer_id: str, name: str) -> None:
        dynsec = self._dynsec()
        if dynsec is None:
            return
        try:
            async with dynsec:
                await dynsec.delete_client(name)
                await dynsec.delete_role(name)
        except (DynSecError, OSError) as exc:
            raise BackendError(f"removing broker credentials failed: {exc}") from None

    async def _port_of(self, customer_id: str) -> int:
        """The instance's port: the one it has, unless another program took it meanwhile (the
        machine restarted, say), then a new one; its deployment then names the new URL."""
        host = self._settings.local_instance_host
        supervised = self._supervised.get(customer_id)
        ours = supervised is not None and supervised.pid is not None
        async with self._pool().acquire() as conn, conn.transaction():
            port = await conn.fetchval(
                "SELECT port FROM local_instances WHERE customer_id = $1 FOR UPDATE", customer_id
            )
            if port is None:
                port = free_port(host)
                await conn.execute(
                    "INSERT INTO local_instances (customer_id, port, created_at) "
                    "VALUES ($1, $2, $3)",
                    customer_id,
                    port,
                    datetime.now(UTC),
                )
            elif not ours and not port_is_free(host, port):
                taken, port = port, free_port(host)
                log.warning(
                    "instance of %s: port %d is taken by another program; moving to %d",
                    customer_id,
                    taken,
                    port,
                )
                await conn.execute(
                    "UPDATE local_instances SET port = $2 WHERE customer_id = $1", customer_id, port
                )
        return int(port)

    def _command(self) -> list[str]:
        if self._settings.local_instance_command:
            return self._settings.local_instance_command.split()
        # ``iotistic run --target instance`` without the command's other targets and tools,
        # which every instance would otherwise carry (about 12 MiB each).
        # -P: the provisioner's working folder is not put first on the instance's path.
        return [sys.executable, "-P", "-m", "services.instance"]

    def _environment(self, customer_id: str, port: int, database_url: str | None) -> dict[str, str]:
        name = instance_name(customer_id)
        env = {k: os.environ[k] for k in INHERITED if k in os.environ}
        env.update(
            {
                MARKER: customer_id,
                "INSTANCE_CUSTOMER_ID": customer_id,
                "DATABASE_URL": database_url or "",
                "LICENSE_FILE": str(self._dir / name / "license.jwt"),
                "LICENSE_JWKS_URL": self._settings.license_jwks_url,
                "HTTP_HOST": self._settings.local_instance_host,
                "HTTP_PORT": str(port),
                "MQTT_HOST": self._settings.mqtt_host,
                "MQTT_PORT": str(self._settings.mqtt_port),
                "MQTT_USERNAME": name,
                "MQTT_PASSWORD": self._password("mqtt", customer_id),
                "MQTT_CLIENT_ID": self._client_id(customer_id),
                "MONITORING_TOKEN": self._password("monitoring", customer_id),
                "ALERT_WEBHOOK_ALLOWED_CIDRS": self._settings.alert_webhook_allowed_cidrs,
                # The shared broker's admin makes device credentials: on one machine the
                # instances share the provisioner's trust (in Kubernetes each has its own broker).
                "MQTT_ADMIN_USERNAME": self._settings.mqtt_admin_username or "",
                "MQTT_ADMIN_PASSWORD": self._settings.mqtt_admin_password or "",
                "CONTROL_PLANE_URL": self._settings.control_plane_url,
                "USAGE_REPORT_SECONDS": str(self._settings.instance_usage_report_seconds),
                "USAGE_TOKEN": instance_usage_token(self._settings.usage_secret, customer_id)
                if self._settings.usage_secret
                else "",
                "LOGIN_RELAY_KEY": login_relay_key(self._settings.login_relay_secret, customer_id)
                if self._settings.login_relay_secret
                else "",
                "LOG_LEVEL": "WARNING",
            }
        )
        return env

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
            command=self._command(),
            env=self._environment(customer_id, port, database_url),
            log_path=self._folder(customer_id) / "instance.log",
            adopted_pid=adopted_pid,
        )
        if start:
            self._begin(supervised)
        return supervised

    def _begin(self, supervised: Supervised) -> None:
        supervised.task = asyncio.create_task(
            self._keep_running(supervised), name=f"instance {supervised.customer_id}"
        )
        self._supervised[supervised.customer_id] = supervised

    def _database_url_of(self, customer_id: str) -> str:
        name = instance_name(customer_id)
        parts = urlsplit(self._admin_url())
        host = parts.hostname or "127.0.0.1"
        password = quote(self._password("database", name))
        netloc = f"{name}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, f"/{name}", parts.query, ""))

    async def _keep_running(self, s: Supervised) -> None:
        backoff = 1.0
        while s.wanted:
            started = asyncio.get_running_loop().time()
            if s.adopted_pid is not None:
                await _wait_pid_gone(s.adopted_pid)
                s.adopted_pid = None
            else:
                with s.log_path.open("ab") as out:
                    s.process = await asyncio.create_subprocess_exec(
                        *s.command,
                        env=s.env,
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=out,
                        stderr=out,
                        start_new_session=True,
                        # It ends with the provisioner, even a killed one (see the top).
                        preexec_fn=end_with_parent(signal.SIGTERM),
                    )
                s.exited.clear()
                code = await s.process.wait()
                s.exited.set()
                if s.wanted:
                    log.warning("instance of %s exited with %s", s.customer_id, code)
            if not s.wanted:
                return
            if asyncio.get_running_loop().time() - started > STABLE_AFTER:
                backoff = 1.0
            s.restarts += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX)

    async def _stop_instance(self, customer_id: str) -> None:
        """Stop the customer's process: the one kept running, and any stray one left here."""
        supervised = self._supervised.pop(customer_id, None)
        if supervised is not None:
            await self._stop_process(supervised)
        stray = instances_running().get(customer_id)
        if stray is not None:
            await _terminate_pid(stray)

    async def _stop_process(self, s: Supervised) -> None:
        s.wanted = False
        pid = s.pid
        if pid is not None:
            await _terminate_pid(pid)
        if s.task is not None:
            s.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await s.task

    async def _wait_ready(self, s: Supervised, license_id: str) -> None:
        url = self._url(s.port)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.local_ready_timeout_seconds
        resend = loop.time()
        # The instance shows which license it holds only to monitoring.
        token = self._password("monitoring", s.customer_id)
        headers = {"Authorization": f"Bearer {token}"}
        while loop.time() < deadline:
            if s.process is not None and s.exited.is_set():
                break  # it died while starting: this attempt failed
            with contextlib.suppress(httpx.HTTPError, ValueError, AttributeError):
                answer = await self._client().get(f"{url}/health/ready", headers=headers, timeout=2)
                held = (answer.json().get("license") or {}).get("license_id")
                if held == license_id:
                    if answer.status_code == 200:
                        return
                elif loop.time() >= resend and s.pid is not None:
                    # It answers with another license: have it re-read the file. Never
                    # signal an instance that does not answer yet: it reads the file as
                    # it starts, and a SIGHUP before its handler is set would end it.
                    os.kill(s.pid, signal.SIGHUP)
                    resend = loop.time() + 2.0
            await asyncio.sleep(0.1)
        code = s.process.returncode if s.process is not None else None
        if code is not None:
            raise BackendError(f"the instance exited with code {code} while starting")
        raise BackendError(
            f"the instance did not become ready with license {license_id} within "
            f"{self._settings.local_ready_timeout_seconds:.0f}s"
        )


# The advisory lock serialising the databases' creation and access rules across provisioners.
DATABASE_ACL_LOCK = 0x10715_D8AC1


def connection_capacity(
    max_connections: int, reserved: int, control_plane: int, per_instance: int
) -> int:
    """Instances the shared Postgres has connections for: what it allows, less what it keeps
    for superusers (``reserved``) and for the control plane, each instance taking
    ``per_instance``."""
    return max(0, (max_connections - reserved - control_plane) // per_instance)


def memory_capacity(available: int, held: int, share: float, per_instance: int) -> int:
    """Instances this machine's memory holds: the memory available now plus what the running
    instances hold (``held``, their RSS), of which instances may take ``share``, each
    ``per_instance`` (bytes)."""
    return max(0, int((available + held) * share) // per_instance)


# Instance roles, by the only name ``instance_name`` makes.
INSTANCE_ROLE = r"^inst_[0-9a-f]{32}$"


async def _confine_role(conn: asyncpg.Connection, role: str) -> None:
    """``role`` (an instance's) may connect to no database but its own.

    Postgres grants CONNECT to PUBLIC on every new database (the control plane's, ``postgres``,
    ``template1``, ...) and cannot take it from one role alone, so it is taken from PUBLIC on
    every database but the instance's own, after the roles that are not instances' and could
    connect (the control plane's own) have been granted it by name. Roles made later need an
    explicit ``GRANT CONNECT``. The instance's own database is taken from PUBLIC too (its
    owner keeps it), under the same lock as the others."""
    async with conn.transaction():
        # One deploy at a time: concurrent GRANTs on one database fail each other (a session
        # holding the lock already, as _ensure_database's, is granted it again at once).
        await conn.execute("SELECT pg_advisory_xact_lock($1)", DATABASE_ACL_LOCK)
        # Its own database too, under the lock: another deploy's pass below may be changing
        # this new database's grants, and two at once fail ("tuple concurrently updated").
        await conn.execute(
            await conn.fetchval(
                "SELECT format('REVOKE CONNECT ON DATABASE %I FROM PUBLIC', $1::text)", role
            )
        )
        databases = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datallowconn AND datname <> $1 "
            "AND (has_database_privilege('public', oid, 'CONNECT') "
            "OR has_database_privilege($1, oid, 'CONNECT'))",
            role,
        )
        for database in (r["datname"] for r in databases):
            keep = await conn.fetch(
                "SELECT rolname FROM pg_roles WHERE rolcanlogin AND NOT rolsuper "
                "AND rolname !~ $2 AND has_database_privilege(oid, "
                "(SELECT oid FROM pg_database WHERE datname = $1), 'CONNECT')",
                database,
                INSTANCE_ROLE,
            )
            statements = [
                *(("GRANT CONNECT ON DATABASE %I TO %I", r["rolname"]) for r in keep),
                ("REVOKE CONNECT ON DATABASE %I FROM PUBLIC", None),
                ("REVOKE CONNECT ON DATABASE %I FROM %I", role),
            ]
            for template, grantee in statements:
                await conn.execute(
                    await conn.fetchval(
                        "SELECT format($1::text, $2::text, $3::text)", template, database, grantee
                    )
                )
        still = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datallowconn AND datname <> $1 "
            "AND has_database_privilege($1, oid, 'CONNECT') ORDER BY datname",
            role,
        )
    if still:
        names = ", ".join(r["datname"] for r in still[:5])
        raise BackendError(
            f"the instance's database role could still connect to {names}: the role in "
            "LOCAL_ADMIN_DATABASE_URL must own those databases or be a superuser"
        )


def _write_private(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    temporary.replace(path)


def instances_running() -> dict[str, int]:
    """Customer id → pid of the instance processes running here (found by their marker).

    An instance's own children (a wrapper's ``sleep``, say) inherit the marker; the instance
    is the marked process whose parent is not marked.
    """
    marked: dict[int, tuple[str, int]] = {}
    for proc in psutil.process_iter():
        try:
            customer = proc.environ().get(MARKER)
            if customer is not None and proc.status() != psutil.STATUS_ZOMBIE:
                marked[proc.pid] = (customer, proc.ppid())
        except psutil.Error:
            continue  # gone meanwhile, or not ours to read
    return {customer: pid for pid, (customer, parent) in marked.items() if parent not in marked}


def _runs_with(pid: int, env: dict[str, str]) -> bool:
    """Whether process ``pid`` was started with every variable of ``env`` as it is there (a
    wrapper may add its own, such as PWD)."""
    try:
        environ = psutil.Process(pid).environ()
    except psutil.Error:
        return False
    return all(environ.get(key) == value for key, value in env.items())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie of ours counts as gone.
    with contextlib.suppress(OSError):
        return " Z " not in Path(f"/proc/{pid}/stat").read_text()
    return True


async def _wait_pid_gone(pid: int) -> None:
    # Not our child (adopted after a restart): nothing to wait on but the pid itself.
    while _alive(pid):  # noqa: ASYNC110
        await asyncio.sleep(0.5)


async def _terminate_pid(pid: int, grace: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        # A stopped process (SIGSTOP, a debugger) handles its SIGTERM only once continued.
        os.kill(pid, signal.SIGCONT)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while _alive(pid) and loop.time() < deadline:  # noqa: ASYNC110 - a pid has no event
        await asyncio.sleep(0.05)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
