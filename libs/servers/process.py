"""Servers we run as child processes: starting, stopping, killing them and what they leave.

``ChildServer`` is what the embedded Postgres, NATS and Mosquitto have in common: a process we
started in a session of its own, with its log, how it is stopped and how it is killed. A Ctrl-C
in the terminal reaches ``iotistic up`` only, which then stops the servers itself, in order.
Each server also ends with the process that started it, however that process ends (kill -9
included): the kernel sends it a signal when its parent goes (``PR_SET_PDEATHSIG``). A server
left running by an earlier run that could not be stopped (found by its data folder or
configuration file) is stopped before a new one starts over the same data.

Processes are found and ended with psutil, never by reading ``/proc`` by hand.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar

import psutil

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0
# How long a server left by an earlier run gets to stop before it is killed.
LEFTOVER_GRACE = 30.0
_LOG_TAIL_BYTES = 4000
_PR_SET_PDEATHSIG = 1
T = TypeVar("T")


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be found, started or reached."""


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


class ChildServer:
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
            doomed = process_tree(process.pid)
            for proc in doomed:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
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
        tail = log_tail(self.log_path)
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


def process_tree(pid: int) -> list[psutil.Process]:
    """The process ``pid`` and every live process below it (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return []
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return [root]


def _wait_gone(procs: list[psutil.Process], timeout: float) -> None:
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


def open_log(path: Path) -> IO[bytes]:
    """Open a server log for appending, readable by its owner only: logs can quote data."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")


def log_tail(path: Path) -> str:
    """The end of a server's log, to quote in an error."""
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(0, size - _LOG_TAIL_BYTES))
            return file.read().decode(errors="replace")
    except OSError as error:
        return f"(no log: {error})"
