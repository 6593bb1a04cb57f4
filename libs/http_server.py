"""How every HTTP server of ours runs: uvicorn's configuration, and a graceful stop.

Kept apart from the ``iotistic`` command so that a customer instance, started by itself
(``python -m services.instance``), serves the same way without loading the command's tools.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import uvicorn


def server_config(app: Any, host: str, port: int, log_level: str) -> uvicorn.Config:
    """How every HTTP server of ours runs under uvicorn (the tests' harness too)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        access_log=False,
        lifespan="on",
        server_header=False,
        # uvicorn would otherwise take the client address from X-Forwarded-For on any request
        # from loopback; only TRUSTED_PROXY_HOPS decides that (libs.http.client_address).
        proxy_headers=False,
    )


class GracefulServer(uvicorn.Server):
    """uvicorn, exiting 0 after a signal-driven graceful stop instead of re-raising the signal."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's signal handling, forgetting the signal once the stop it asked for is done."""
        with super().capture_signals():
            yield
            # The signal asked for a graceful stop and got one; the process ends normally.
            self._captured_signals.clear()
