"""Ending a child server's whole process tree: found with psutil, never by reading /proc."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil

from libs.servers.process import end_processes, process_tree


def test_process_tree_names_the_process_and_everything_below_it() -> None:
    # A shell that starts a grandchild and waits for it, as a postmaster keeps its backends.
    parent = subprocess.Popen(["/bin/sh", "-c", "sleep 60 & wait"])
    try:
        deadline = time.monotonic() + 10
        while len(process_tree(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = process_tree(parent.pid)
        assert tree[0].pid == parent.pid
        assert [p.name() for p in tree[1:]] == ["sleep"]
        killed = end_processes(tree, signal.SIGTERM, grace=10.0)
        assert killed == []
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)
    finally:
        parent.kill()
        parent.wait()


def test_process_tree_of_a_process_that_is_gone_is_empty() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert process_tree(gone.pid) == []
