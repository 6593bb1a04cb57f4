"""How every HTTP server of ours runs: uvicorn's configuration, and a graceful stop.

Kept apart from the ``iotistic`` command so that a customer instance, started by itself
(``python -m services.instance``), serves the same way without loading the command's tools.
"""

from __future__ import annotations

import asyncio
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
        # from loopback; only TRUSTED_PROXY_HOPS decides that (libs.http.app.client_address).
        proxy_headers=False,
    )


class GracefulServer(uvicorn.Server):
    """uvicorn, exiting 0 after a signal-driven graceful stop instead of re-raising the signal.

    ``tick_seconds`` is how often its main loop wakes to refresh the Date header and see
    whether it was asked to stop: uvicorn's 0.1 s costs an idle process about 0.15% of a core,
    which hundreds of idle customer instances on one host can spare better as 1 s (a stop then
    begins within a second)."""

    def __init__(self, config: uvicorn.Config, *, tick_seconds: float = 0.1) -> None:
        """``config`` as uvicorn's; ``tick_seconds`` as above."""
        super().__init__(config)
        self.tick_seconds = tick_seconds

    async def main_loop(self) -> None:
        """uvicorn's loop at ``tick_seconds``. Its counter counts tenths of a second, as
        ``on_tick`` expects (it refreshes the Date header at each multiple of 10)."""
        per_tick = max(1, round(self.tick_seconds * 10))
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + per_tick) % 864000
            await asyncio.sleep(self.tick_seconds)
            should_exit = await self.on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's signal handling, forgetting the signal once the stop it asked for is done."""
        with super().capture_signals():
            yield
            # The signal asked for a graceful stop and got one; the process ends normally.
            self._captured_signals.clear()
