"""The instance processes: one kept running per customer (restarted with backoff when it dies),
found again by the marker in its environment, and stopped.

An instance ends with the provisioner that started it (its parent-death signal), so nothing
outlives ``iotistic up``. One still running when the provisioner starts is found by its marker
(``instances_running``) and adopted: watched by its pid until it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from libs.servers.process import end_with_parent

log = logging.getLogger(__name__)

# In every instance's environment: the customer it runs for.
MARKER = "IOTISTIC_INSTANCE_OF"
RESTART_BACKOFF_MAX = 30.0
# Running this long, an instance counts as started well: the next restart waits 1 s again.
STABLE_AFTER = 60.0


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
    # The trace it is started for (TRACEPARENT, TRACESTATE of the deploy's span): given to its
    # first run only, so a restart days later does not join that deploy's trace.
    trace: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        """The running process's id, if any."""
        if self.process is not None and self.process.returncode is None:
            return self.process.pid
        return self.adopted_pid


async def keep_running(s: Supervised) -> None:
    """Run ``s`` (or watch its adopted process) and start it again each time it ends, with
    backoff, until it is no longer wanted."""
    backoff = 1.0
    while s.wanted:
        started = asyncio.get_running_loop().time()
        if s.adopted_pid is not None:
            await _wait_pid_gone(s.adopted_pid)
            s.adopted_pid = None
        else:
            await _run_once(s)
        if not s.wanted:
            return
        if asyncio.get_running_loop().time() - started > STABLE_AFTER:
            backoff = 1.0
        s.restarts += 1
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, RESTART_BACKOFF_MAX)


async def _run_once(s: Supervised) -> None:
    """Start the process, its output appended to its log, and wait until it exits."""
    env, s.trace = {**s.env, **s.trace}, {}
    with s.log_path.open("ab") as out:
        s.process = await asyncio.create_subprocess_exec(
            *s.command,
            env=env,
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


async def stop(s: Supervised) -> None:
    """Stop ``s`` for good: its process, then the task that kept it running."""
    s.wanted = False
    pid = s.pid
    if pid is not None:
        await terminate_pid(pid)
    if s.task is not None:
        s.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await s.task


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


def runs_with(pid: int, env: dict[str, str]) -> bool:
    """Whether process ``pid`` was started with every variable of ``env`` as it is there (a
    wrapper may add its own, such as PWD)."""
    try:
        environ = psutil.Process(pid).environ()
    except psutil.Error:
        return False
    return all(environ.get(key) == value for key, value in env.items())


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs; a zombie of ours counts as gone."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


async def _wait_pid_gone(pid: int) -> None:
    # Not our child (adopted after a restart): nothing to wait on but the pid itself.
    while _alive(pid):  # noqa: ASYNC110
        await asyncio.sleep(0.5)


async def terminate_pid(pid: int, grace: float = 10.0) -> None:
    """SIGTERM to ``pid`` (continued, should it be stopped), SIGKILL after ``grace`` seconds."""
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
