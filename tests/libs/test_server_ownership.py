"""The embedded servers belong to the process that started them, and heal in place.

- they end when that process ends, even on kill -9 (their parent-death signal);
- a server left running over the same data by an earlier run is stopped before a new one
  starts, and a stale Postgres lock file is cleared once nothing uses the data folder;
- a server that dies is reaped and started again on its own port by ``ServerKeeper``, whose
  readiness says it is down while it is;
- the port check treats a port with only closed connections (TIME_WAIT) as free, as servers do.

All real: Postgres, NATS and Mosquitto processes, killed with real signals.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import asyncpg
import psutil
import pytest

from libs.servers.keeper import ServerKeeper
from libs.servers.mosquitto import EmbeddedMosquitto
from libs.servers.nats import EmbeddedNats
from libs.servers.ports import free_port, port_is_free
from libs.servers.postgres import EmbeddedPostgres
from libs.servers.postgres_account import PG_SYSTEM_USER
from libs.servers.process import end_processes

pytestmark = pytest.mark.slow


def gone(pid: int, timeout: float = 15.0) -> bool:
    """Whether ``pid`` ends (or is only a zombie) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_servers_end_when_the_process_that_started_them_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import json, sys, time
        from pathlib import Path
        from libs.servers.nats import EmbeddedNats
        from libs.servers.postgres import EmbeddedPostgres
        from libs.servers.mosquitto import EmbeddedMosquitto
        root = Path({str(tmp_path)!r})
        servers = [EmbeddedPostgres(root / "pg"), EmbeddedNats(root / "nats")]
        servers.append(EmbeddedMosquitto(root / "mqtt"))
        for server in servers:
            server.start()
        print(json.dumps([server.pid for server in servers]), flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    try:
        assert parent.stdout is not None
        pids = json.loads(parent.stdout.readline())
        assert all(psutil.pid_exists(pid) for pid in pids)
        parent.kill()  # kill -9: nothing of ours runs in it any more
        parent.wait()
        assert all(gone(pid, timeout=30) for pid in pids), [p for p in pids if psutil.pid_exists(p)]
    finally:
        parent.kill()
        for proc in psutil.process_iter():
            try:
                if str(tmp_path) in " ".join(proc.cmdline()) or proc.cwd().startswith(
                    str(tmp_path)
                ):
                    proc.kill()
            except psutil.Error:
                pass


async def test_a_postgres_left_by_an_earlier_run_is_stopped_and_its_data_served_again(
    tmp_path: Path,
) -> None:
    earlier = EmbeddedPostgres(tmp_path / "pg")
    earlier.start()
    conn = await asyncpg.connect(earlier.url)
    await conn.execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (7)")
    await conn.close()
    orphan = earlier.pid
    assert orphan is not None
    earlier._process = None

    later = EmbeddedPostgres(tmp_path / "pg", port=free_port())
    try:
        later.start()
        assert gone(orphan, timeout=1)
        conn = await asyncpg.connect(later.url)
        assert await conn.fetchval("SELECT n FROM kept") == 7
        await conn.close()
    finally:
        later.stop()
        if psutil.pid_exists(orphan):
            os.kill(orphan, signal.SIGKILL)


async def test_a_stale_lock_file_naming_a_live_stranger_is_cleared(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg")
    pg.start()
    pg.stop()
    # After a crash, the pid in the lock file may belong to another program of the same
    # account by now: Postgres alone then refuses to start ("is another postmaster running?").
    same_account = {"user": PG_SYSTEM_USER} if os.geteuid() == 0 else {}
    stranger = subprocess.Popen(["sleep", "60"], **same_account)  # type: ignore[call-overload]
    try:
        lock = pg.data_dir / "postmaster.pid"
        lock.write_text(f"{stranger.pid}\n{pg.data_dir}\n0\n{pg.port}\n\n\n\nready\n")
        pg.start()
        assert pg.is_running
        assert stranger.poll() is None  # the stranger is left alone
        assert lock.read_text().split()[0] == str(pg.pid)
    finally:
        pg.stop()
        stranger.kill()
        stranger.wait()


async def test_postgres_killed_with_busy_backends_starts_again_in_place(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg")
    pg.start()
    try:
        conns = [await asyncpg.connect(pg.url) for _ in range(3)]
        # A backend busy in a query outlives its postmaster for a while, holding the memory
        # a new postmaster needs.
        busy = asyncio.ensure_future(conns[0].execute("SELECT pg_sleep(30)"))
        await asyncio.sleep(0.3)
        assert pg.pid is not None
        os.kill(pg.pid, signal.SIGKILL)
        await asyncio.sleep(0.2)
        assert pg.has_died  # and reaped by asking
        pg.start()
        conn = await asyncpg.connect(pg.url)
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()
        await asyncio.gather(busy, return_exceptions=True)
        for c in conns:
            c.terminate()
    finally:
        pg.stop()


async def test_the_keeper_restarts_a_dead_server_on_its_port_and_says_so_meanwhile(
    tmp_path: Path,
) -> None:
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    keeper = ServerKeeper([server], every=0.1)
    task = asyncio.create_task(keeper.run())
    try:
        assert keeper.readiness() == (True, {"nats-server": keeper.kept["nats-server"].view()})
        port, first = server.port, server.pid
        assert first is not None
        # Hold the port so the restart fails for a while: readiness must say so.
        os.kill(first, signal.SIGKILL)
        holder = socket.socket()
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for _ in range(100):
            try:
                holder.bind(("127.0.0.1", port))
                break
            except OSError:
                await asyncio.sleep(0.01)
        holder.listen()
        ok, views = keeper.readiness()
        deadline = time.monotonic() + 30
        while keeper.kept["nats-server"].error is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            ok, views = keeper.readiness()
        assert not ok
        assert views["nats-server"]["state"] == "restarting"
        assert views["nats-server"]["last_exit"] == "killed by SIGKILL"
        assert "error" in views["nats-server"]
        holder.close()
        deadline = time.monotonic() + 60
        while not keeper.readiness()[0] and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        ok, views = keeper.readiness()
        assert ok, views
        assert server.port == port and server.pid not in (None, first)
        assert views["nats-server"]["restarts"] >= 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.stop()


async def test_the_keeper_leaves_a_server_stopped_on_purpose_alone(tmp_path: Path) -> None:
    server = EmbeddedMosquitto(tmp_path / "mqtt")
    server.start()
    keeper = ServerKeeper([server], every=0.05)
    task = asyncio.create_task(keeper.run())
    try:
        server.stop()
        await asyncio.sleep(0.5)
        assert not server.is_running
        assert keeper.kept["mosquitto"].restarts == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.stop()


def test_a_port_with_only_closed_connections_is_free_as_servers_see_it() -> None:
    port = free_port()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen()
    assert not port_is_free("127.0.0.1", port)
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server side closes first: its end waits in TIME_WAIT
    client.close()
    listener.close()
    assert port_is_free("127.0.0.1", port)


@pytest.mark.parametrize("kind", [EmbeddedPostgres, EmbeddedNats, EmbeddedMosquitto])
async def test_the_keeper_replaces_a_server_that_stopped_answering(
    tmp_path: Path, kind: type[EmbeddedPostgres | EmbeddedNats | EmbeddedMosquitto]
) -> None:
    server = kind(tmp_path / "server")
    server.start()
    keeper = ServerKeeper([server], every=0.05, unresponsive_after=1.0, probe_every=0.2)
    task = asyncio.create_task(keeper.run())
    try:
        port, wedged = server.port, server.pid
        assert wedged is not None
        os.kill(wedged, signal.SIGSTOP)  # alive, holding its port, answering nothing
        deadline = time.monotonic() + 60
        # Readiness says so before the keeper gives up on it.
        while time.monotonic() < deadline:
            ok, views = keeper.readiness()
            if views[server.name]["state"] != "running" or keeper.kept[server.name].restarts:
                break
            await asyncio.sleep(0.05)
        assert not ok and views[server.name]["state"] == "not answering", views
        while keeper.kept[server.name].restarts == 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        while not keeper.readiness()[0] and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        ok, views = keeper.readiness()
        assert ok, views
        assert views[server.name]["last_exit"].startswith("not answering for")
        assert gone(wedged, timeout=1)
        assert server.port == port and server.pid != wedged
        assert await asyncio.to_thread(server.answers)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.stop()


def test_a_stopped_leftover_gets_its_signal_not_the_kill_after_the_grace() -> None:
    # A server frozen (SIGSTOP) when `up` was killed keeps its parent-death signal pending;
    # asked to stop, it must be continued to act on it rather than be killed after the grace.
    frozen = subprocess.Popen(["sleep", "60"])
    os.kill(frozen.pid, signal.SIGSTOP)
    assert end_processes([psutil.Process(frozen.pid)], signal.SIGTERM, grace=5) == []
    assert gone(frozen.pid, timeout=1)
