"""Periodic jobs of a service (schedulers) that ride out outages of Postgres and NATS."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from libs.projections.apply import TRANSIENT_ERRORS
from libs.runtime.service import ServiceUnavailable
from libs.runtime.supervision import Worker, beat

log = logging.getLogger(__name__)

# What a scheduler's pass may take beyond its intervals before it counts as stuck.
STUCK_GRACE_SECONDS = 60.0

# Failures that pass: the next pass tries again.
PASSING: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, ServiceUnavailable)


async def run_every(seconds: float, name: str, job: Callable[[], Awaitable[int]]) -> None:
    """Run ``job`` every ``seconds`` for ever; it returns how many things it did, logged.

    A pass that fails for a passing reason (the database or the log away) is logged and tried
    at the next pass; any other error ends the loop, for its supervisor to report and restart.
    Every pass beats, so a pass that hangs shows as stuck.
    """
    while True:
        try:
            done = await job()
            if done:
                log.info("%s: %d done", name, done)
        except PASSING as exc:
            log.warning("%s: %r; next pass in %.0fs", name, exc, seconds)
        beat()
        await asyncio.sleep(seconds)


def every(seconds: float, name: str, job: Callable[[], Awaitable[int]]) -> Worker:
    """A supervised scheduler: ``job`` every ``seconds``; stuck when a pass takes more than
    three intervals and a minute."""
    return Worker(
        name=name,
        start=lambda: run_every(seconds, name, job),
        stuck_after=3 * seconds + STUCK_GRACE_SECONDS,
    )
