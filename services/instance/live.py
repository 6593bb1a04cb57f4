"""Readings as they are stored, handed to the browsers watching the dashboard's live charts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from services.instance.readings import METRICS


class LiveReadings:
    """Fans each stored reading out to the browsers watching (bounded queues: a slow browser
    misses points, it never holds ingest up)."""

    def __init__(self) -> None:
        """No one is watching yet."""
        self._queues: set[asyncio.Queue[dict[str, Any]]] = set()

    def publish(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Hand stored readings (rows of ``readings``) to every watcher that has room."""
        if not self._queues:
            return
        for row in rows:
            reading = {
                "device_id": row[0],
                "ts": row[1].isoformat(),
                **dict(zip(METRICS, row[2 : 2 + len(METRICS)], strict=True)),
            }
            for queue in self._queues:
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(reading)

    @contextlib.contextmanager
    def watch(self) -> Iterator[asyncio.Queue[dict[str, Any]]]:
        """A queue of readings for one browser, while it is connected."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)
