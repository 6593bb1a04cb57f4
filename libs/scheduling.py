"""Periodic jobs of a service (schedulers) that ride out outages of Postgres and NATS."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from libs.projections import TRANSIENT_ERRORS
from libs.runtime import ServiceUnavailable

log = logging.getLogger(__name__)

# Failures that pass: the next pass tries again.
PASSING: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, ServiceUnavailable)


async def run_every(seconds: float, name: str, job: Callable[[], Awaitable[int]]) -> None:
    """Run ``job`` every ``seconds`` for ever; it returns how many things it did, logged."""
    while True:
        try:
            done = await job()
            if done:
                log.info("%s: %d done", name, done)
        except PASSING as exc:
            log.warning("%s: %r; next pass in %.0fs", name, exc, seconds)
        await asyncio.sleep(seconds)
