"""What the experiments do to the platform while a fault lasts: signups over the public API,
and a watch on every process's readiness."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx

from tests.chaos.cluster import Probe, probe_ready

SIGNUP_TIMEOUT = 20.0


@dataclass
class Attempt:
    """One signup as the client saw it: the status code, or ``timeout``/``refused``."""

    email: str
    password: str
    status: str = "not sent"
    seconds: float = 0.0


async def sign_up(
    url: str, count: int, *, concurrency: int = 8, spacing: float = 0.5, tag: str = ""
) -> list[Attempt]:
    """``count`` signups, the i-th released ``i * spacing`` s after the first, at most
    ``concurrency`` in flight; each request bounded by ``SIGNUP_TIMEOUT``."""
    tag = tag or secrets.token_hex(3)
    attempts = [
        Attempt(f"chaos-{tag}-{i}@example.com", f"chaos passphrase {secrets.token_hex(6)}")
        for i in range(count)
    ]
    gate = asyncio.Semaphore(concurrency)
    started = time.monotonic()

    async def one(index: int, attempt: Attempt, client: httpx.AsyncClient) -> None:
        await asyncio.sleep(max(0.0, started + index * spacing - time.monotonic()))
        async with gate:
            body = {
                "email": attempt.email,
                "password": attempt.password,
                "company_name": "Chaos Air",
            }
            sent = time.monotonic()
            try:
                response = await client.post("/api/customers/signup", json=body)
                attempt.status = str(response.status_code)
            except httpx.TimeoutException:
                attempt.status = "timeout"
            except httpx.TransportError:
                attempt.status = "refused"
            attempt.seconds = time.monotonic() - sent

    async with httpx.AsyncClient(base_url=url, timeout=SIGNUP_TIMEOUT) as client:
        await asyncio.gather(*(one(i, a, client) for i, a in enumerate(attempts)))
    return attempts


def tally(attempts: list[Attempt]) -> str:
    """``48x201 12x503``: the answers the client got."""
    counts = Counter(a.status for a in attempts)
    return " ".join(f"{n}x{status}" for status, n in sorted(counts.items()))


@dataclass
class Fault:
    """A fault's window and the processes whose readiness should show it."""

    name: str
    watched: tuple[str, ...]
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    # For a killed process nobody answers: "down" is how its readiness shows the fault.
    down_counts: bool = False

    def end(self) -> None:
        if self.ended is None:
            self.ended = time.monotonic()


@dataclass
class ReadinessWatch:
    """Every ``interval`` s, each process's ``/health/ready``; the probes are kept."""

    targets: Callable[[], dict[str, str]]
    interval: float = 0.5
    probes: list[Probe] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ReadinessWatch]:
        task = asyncio.create_task(self._watch())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        async with httpx.AsyncClient() as client:
            while True:
                at = time.monotonic()
                targets = self.targets()
                bound = self.interval * 4
                statuses = await asyncio.gather(
                    *(probe_ready(client, url, timeout=bound) for url in targets.values())
                )
                self.probes += [
                    Probe(at, name, status) for name, status in zip(targets, statuses, strict=True)
                ]
                await asyncio.sleep(max(0.0, at + self.interval - time.monotonic()))

    def during(self, fault: Fault) -> Counter[str]:
        """What the fault's watched processes answered while it lasted."""
        end = fault.ended if fault.ended is not None else time.monotonic()
        return Counter(
            p.status
            for p in self.probes
            if p.name in fault.watched and fault.started <= p.at <= end
        )

    def showed(self, fault: Fault) -> bool:
        """Readiness was 503 at some point during the fault (or, for a killed process, it did
        not answer at all)."""
        seen = self.during(fault)
        return seen["503"] > 0 or (fault.down_counts and seen["down"] > 0)
