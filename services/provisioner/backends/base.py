"""The one interface every provisioning backend implements, and what a job hands it.

A backend turns a job into a running (or removed) customer instance. Every method is
idempotent: a job retried after a crash calls it again with the same spec, and it must converge
on the same result rather than fail or duplicate anything.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from contracts.credentials import derived_secret

# Reports a step: percent done (0-100) and the step's name, e.g. (40, "database").
Progress = Callable[[int, str], Awaitable[None]]


def derive_password(secret: bytes, purpose: str, customer_id: str, generation: int = 0) -> str:
    """A customer's password for ``purpose`` (``database``, ``mqtt``): the same on every retry,
    so nothing secret needs storing; derived from ``PROVISIONER_SECRET``.

    ``generation`` is the customer's credentials generation: rotating their credentials bumps
    it, which gives every password a new value. Generation 0 is the derivation of the versions
    before rotation existed, so customers never rotated keep the passwords they have."""
    if generation < 0:
        raise ValueError("a credentials generation is 0 or more")
    if generation == 0:
        return derived_secret(secret, purpose, customer_id)
    # '#' is in no purpose, so "database#1" can never be another purpose's generation 0.
    return derived_secret(secret, f"{purpose}#{generation}", customer_id)


class BackendError(Exception):
    """A step failed; the message says which and why, without secrets. The job may retry."""


@dataclass(frozen=True)
class InstanceSpec:
    """Everything a backend needs to run one customer's instance."""

    customer_id: str
    plan: str
    # The customer's current license: the signed RS256 JWT and its id.
    license_jwt: str
    license_id: str
    # Where the instance fetches the public keys that verify its license.
    jwks_url: str
    # Limits from the license, for quotas and sizing.
    max_devices: int = 10
    # Set (to the job's id) when the running instance must be replaced, not kept: the health
    # watch's redeploy of a broken one. A retry of that job passes the same key.
    restart_key: str | None = None


@dataclass(frozen=True)
class Deployed:
    """What a successful deploy or update reports."""

    instance_url: str
    components: dict[str, str] = field(default_factory=dict)


LimitedBy = Literal["connections", "memory", "setting"]


@dataclass(frozen=True)
class Capacity:
    """How many instances the backend can hold, and which bound says so.

    ``limit`` None: no limit known (a cluster that grows). ``bounds`` holds every bound that
    was measured, by name, so an operator sees how close the others are."""

    limit: int | None
    limited_by: LimitedBy | None = None
    bounds: dict[str, int] = field(default_factory=dict)


def tightest(bounds: dict[LimitedBy, int | None]) -> Capacity:
    """The capacity the smallest of the measured ``bounds`` allows (None ones were not
    measured); on a tie the first named wins."""
    known = {name: value for name, value in bounds.items() if value is not None}
    if not known:
        return Capacity(limit=None)
    name = min(known, key=lambda n: known[n])
    return Capacity(
        limit=known[name], limited_by=name, bounds={str(n): v for n, v in known.items()}
    )


@dataclass(frozen=True)
class InstanceHealth:
    """What one health check of a deployed instance found."""

    healthy: bool
    # Why it is not healthy, in a line (no secrets): what InstanceDegraded records.
    reason: str = ""


class Backend(Protocol):
    """A way to run customer instances: ``local`` processes or ``kubernetes``."""

    name: str

    async def start(self) -> None:
        """Begin serving: find the instances that should be running again (after a restart)."""

    async def stop(self) -> None:
        """Stop serving (the local backend stops its processes; kubernetes does nothing)."""

    async def deploy(self, spec: InstanceSpec, progress: Progress) -> Deployed:
        """Create or converge the customer's instance and wait until it answers."""

    async def update(self, spec: InstanceSpec, progress: Progress) -> Deployed:
        """Hand the running instance its new license (and plan); roll it if needed."""

    async def delete(self, customer_id: str, progress: Progress, erase: bool = False) -> None:
        """Remove the customer's instance. ``erase``: the customer asked for their data to go,
        at once. Without it a backend may keep the data for a grace period (kubernetes does;
        local removes everything at once either way)."""

    async def status(self, customer_id: str) -> dict[str, object]:
        """The backend's view of the instance: release state and each component's state."""

    async def capacity(self) -> Capacity:
        """How many instances this backend can run at most now (running ones included)."""

    async def health(self, customer_id: str) -> InstanceHealth:
        """Whether the deployed instance serves: ready, answering. Raises ``BackendError``
        when the backend cannot tell (its API is away), which says nothing of the instance."""
