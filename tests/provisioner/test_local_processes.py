"""The local backend's instance processes, read with psutil: a process that has exited but
whose parent has not reaped it yet (a zombie) counts as gone, so stopping one does not wait
out its grace period; a process that ignores SIGTERM is killed after it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from services.provisioner.backends.local.processes import terminate_pid


async def test_a_process_that_ends_on_sigterm_is_stopped_without_waiting_out_its_grace() -> None:
    # Our own child: once it exits it stays a zombie until waited for, which counts as gone.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = time.monotonic()
        await terminate_pid(child.pid, grace=20.0)
        assert time.monotonic() - started < 10.0
        assert child.wait(timeout=5) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()


async def test_a_process_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    ignores = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ignoring', flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", ignores], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "ignoring\n"  # its handler is set
        await terminate_pid(child.pid, grace=0.5)
        assert child.wait(timeout=5) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
