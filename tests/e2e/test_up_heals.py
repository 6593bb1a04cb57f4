"""`iotistic up` heals itself, as an operator's worst day would test it.

- kill -9 of `up`: nothing it started keeps running, and the next `up` brings every instance
  back healthy and every account "ready" within a minute, with no hand work, on the same ports;
- kill -9 of the embedded Postgres, NATS or Mosquitto under `up`: `up` starts it again itself,
  the platform and the instances reconnect, and a new customer still gets an instance;
- Ctrl-C stops everything within its timeout;
- secrets set in the environment (ADMIN_TOKEN) are used, not replaced.

Everything is the command as shipped, on its embedded servers, in a temporary data folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from test_platform import IOTISTIC, wait_status

from libs.servers.ports import free_port
from services.provisioner.backends.local.processes import MARKER
from support import eventually, license_keys_dir

pytestmark = pytest.mark.slow

ADMIN = "an admin token the operator chose"


class Up:
    """One `iotistic up` process over ``data_dir``."""

    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir, self.port = data_dir, port
        env = {
            **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "NATS_URL")},
            "LOG_LEVEL": "WARNING",
            "ADMIN_TOKEN": ADMIN,
        }
        self.process = subprocess.Popen(
            [IOTISTIC, "--data-dir", str(data_dir), "up", "--port", str(port)], env=env
        )
        self.url = f"http://127.0.0.1:{port}"

    @property
    def runtime(self) -> dict[str, Any]:
        return json.loads((self.data_dir / "runtime.json").read_text())

    async def ready(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
            await wait_status(client, 200, timeout=120)

    def stop(self, timeout: float = 90) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=timeout)


def everything_started_by(data_dir: Path) -> list[psutil.Process]:
    """The servers and instances working over ``data_dir``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.cmdline())
            environ = proc.environ()
            if (
                str(data_dir) in cmdline
                or proc.cwd().startswith(str(data_dir))
                or environ.get("LICENSE_FILE", "").startswith(str(data_dir))
            ):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def all_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """The processes of ``procs`` still alive after ``timeout`` seconds."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@asynccontextmanager
async def running_up(tmp_path: Path) -> AsyncIterator[tuple[Up, Path]]:
    data_dir = tmp_path / "data"
    # A 2048-bit test key saves the 4096-bit first-start generation; `up` uses what it finds.
    shutil.copytree(license_keys_dir(), data_dir / "keys" / "licensing")
    up = Up(data_dir, free_port())
    try:
        await up.ready()
        yield up, data_dir
    finally:
        if up.process.poll() is None:
            up.process.kill()
        # Whatever the test did, leave nothing of this data folder running.
        for proc in everything_started_by(data_dir):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


async def sign_up(api: httpx.AsyncClient, n: int) -> dict[str, str]:
    email = f"heal{n}-{time.monotonic_ns()}@example.com"
    password = f"a long passphrase {n}"
    signed = await api.post(
        "/api/customers/signup",
        json={"email": email, "password": password, "company_name": f"Heal {n}"},
    )
    assert signed.status_code == 201, signed.text
    login = await api.post("/api/customers/login", json={"email": email, "password": password})
    assert login.status_code == 200, login.text
    return {"Authorization": f"Bearer {login.json()['token']}"}


async def instance_ready(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=3) as client:
            return (await client.get(f"{url}/health/ready")).status_code == 200
    except httpx.TransportError:
        return False


async def healthy_account(api: httpx.AsyncClient, auth: dict[str, str]) -> str | None:
    """The instance URL when the account says "ready" and the instance says so too."""
    try:
        me = await api.get("/api/customers/me", headers=auth)
    except httpx.TransportError:
        return None
    if me.status_code != 200:
        return None
    deployment = me.json()["deployment"]
    if deployment["status"] != "ready":
        return None
    url: str = deployment["instance_url"]
    return url if await instance_ready(url) else None


async def every_account_healthy(
    api: httpx.AsyncClient, auths: list[dict[str, str]], timeout: float
) -> list[str]:
    urls = []
    for auth in auths:
        urls.append(
            await eventually(
                lambda auth=auth: healthy_account(api, auth),
                lambda url: url is not None,
                timeout=timeout,
                what="an account ready over a healthy instance",
            )
        )
    return urls


async def test_kill_9_of_up_leaves_nothing_and_the_next_up_heals_every_instance(
    tmp_path: Path,
) -> None:
    async with running_up(tmp_path) as (up, data_dir):
        async with httpx.AsyncClient(base_url=up.url, timeout=30) as api:
            auths = [await sign_up(api, n) for n in range(3)]
            urls = await every_account_healthy(api, auths, timeout=90)
            # The admin token the operator set is the one in force; none was generated.
            queue = await api.get("/api/queue/stats", headers={"Authorization": f"Bearer {ADMIN}"})
            assert queue.status_code == 200, queue.text
            assert not (data_dir / "secrets" / "admin-token").exists()

        ports = json.loads((data_dir / "ports.json").read_text())
        before = everything_started_by(data_dir)
        names = " ".join(" ".join(p.cmdline()) for p in before)
        assert "postgres" in names and "nats-server" in names and "mosquitto" in names
        assert sum(MARKER in p.environ() for p in before) >= 3

        up.process.kill()  # kill -9
        up.process.wait()
        assert all_gone(before, timeout=30) == []

        started = time.monotonic()
        again = Up(data_dir, up.port)
        try:
            await again.ready()
            async with httpx.AsyncClient(base_url=again.url, timeout=30) as api:
                assert await every_account_healthy(api, auths, timeout=60) == urls
            healed_in = time.monotonic() - started
            assert healed_in < 60, f"healed in {healed_in:.0f} s"
            assert json.loads((data_dir / "ports.json").read_text()) == ports

            # Ctrl-C stops everything within its timeout, and nothing is left.
            running = everything_started_by(data_dir)
            assert again.stop(timeout=90) == 0
            assert all_gone(running, timeout=5) == []
        finally:
            if again.process.poll() is None:
                again.process.kill()


async def server_view(api: httpx.AsyncClient, name: str) -> dict[str, Any]:
    try:
        answer = await api.get("/health/ready")
        return {"status": answer.status_code, **answer.json().get("servers", {}).get(name, {})}
    except (httpx.TransportError, ValueError):
        return {"status": None}


@pytest.mark.parametrize("server", ["postgres", "nats-server", "mosquitto"])
async def test_a_server_killed_under_up_is_started_again_by_up(tmp_path: Path, server: str) -> None:
    async with (
        running_up(tmp_path) as (up, _data_dir),
        httpx.AsyncClient(base_url=up.url, timeout=30) as api,
    ):
        auths = [await sign_up(api, 0)]
        [url] = await every_account_healthy(api, auths, timeout=90)
        pid = up.runtime["servers"][server]
        port_before = json.loads((up.data_dir / "ports.json").read_text())

        os.kill(pid, signal.SIGKILL)
        view = await eventually(
            lambda: server_view(api, server),
            lambda v: v.get("restarts", 0) >= 1 and v.get("ok") and v["status"] == 200,
            timeout=60,
            interval=0.2,
            what=f"{server} started again by up, and the platform ready",
        )
        assert view["pid"] != pid
        assert view["last_exit"] == "killed by SIGKILL"
        assert json.loads((up.data_dir / "ports.json").read_text()) == port_before
        # The customer's instance reconnects by itself, and a new customer still gets one.
        await eventually(lambda: instance_ready(url), bool, timeout=60, what="instance back")
        await every_account_healthy(api, [*auths, await sign_up(api, 1)], timeout=90)


def test_the_data_folder_is_held_by_one_up_and_a_stale_runtime_pid_is_not_believed(
    tmp_path: Path,
) -> None:
    from services.cli.data_folder import hold_data_folder, running_up_pid

    # A dead run's runtime file names a pid that now belongs to another "iotistic" program.
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "iotistic"])
    try:
        # Until it has exec'd, the child still shows pytest's command line.
        deadline = time.monotonic() + 30
        while "iotistic" not in " ".join(psutil.Process(stranger.pid).cmdline()):
            assert time.monotonic() < deadline, "the stand-in process did not start"
            time.sleep(0.01)
        (tmp_path / "runtime.json").write_text(json.dumps({"pid": stranger.pid}))
        (tmp_path / "up.lock").write_text("12345")  # left by that run; nobody holds it
        assert running_up_pid(tmp_path) is None  # so the runtime file is stale
        held = hold_data_folder(tmp_path)
        assert held is not None
        # A second `up`, even one starting before any runtime file exists, is refused.
        assert hold_data_folder(tmp_path) is None
        assert running_up_pid(tmp_path) == stranger.pid
        os.close(held)
        assert hold_data_folder(tmp_path) is not None
    finally:
        stranger.kill()
        stranger.wait()


def test_a_damaged_ports_file_never_yields_a_bad_or_standard_port(tmp_path: Path) -> None:
    from services.cli.data_folder import PortBook

    path = tmp_path / "ports.json"
    path.write_text(json.dumps({"nats": 99999, "postgres": 5432, "mqtt": 0, "nats-monitor": 40123}))
    book = PortBook(path)
    assert book.recorded("nats") is None
    assert book.recorded("postgres") is None
    assert book.recorded("mqtt") is None
    assert book.recorded("nats-monitor") == 40123
    assert book.take("postgres", "127.0.0.1") not in (5432, 0)
    path.write_text("{not json")
    assert PortBook(path).ports == {}
