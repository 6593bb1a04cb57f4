"""CI's share of `./dev chaos`: the short subset (SIGSTOP of NATS for 5 s, kill -9 of the
signup service in separated mode, about ten signups each) against real servers the harness
starts itself on free ports, as a subprocess, as an operator runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# The harness bounds each short experiment at 300 s; this only guards against the harness.
TIMEOUT = 720


@pytest.mark.timeout(TIMEOUT + 60)
def test_the_short_chaos_run_passes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.chaos", "--short"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    output = result.stdout + result.stderr
    assert "short-nats-stop" in output and "short-service-kill" in output, output
    assert result.returncode == 0, output
