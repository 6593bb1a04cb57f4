"""The deployment queue's rules, as pure decisions: no I/O, so each is tested alone.

Which job a new request merges into and which pending jobs it supersedes (collapsing), how
urgent a job is, what a license asks for, how long a failed attempt waits, when an attempt is
the last, and when a failed job may run again. ``queue.py`` and ``leases.py`` read the rows,
ask these, and write what they decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

Kind = Literal["deploy-customer-stack", "update-customer-stack", "delete-customer-stack"]
DEPLOY: Kind = "deploy-customer-stack"
UPDATE: Kind = "update-customer-stack"
DELETE: Kind = "delete-customer-stack"
STATES = ("waiting", "active", "delayed", "completed", "failed")
PENDING = ("waiting", "delayed")
FINISHED = ("completed", "failed", "superseded")
PLAN_PRIORITY = {"enterprise": 1, "professional": 2, "starter": 3, "trial": 5}


def priority_of(kind: str, plan: str | None) -> int:
    """How urgent a job is, 1 (most) to 10."""
    if kind == DELETE:
        return 1
    if kind == UPDATE:
        return 3
    return PLAN_PRIORITY.get(plan or "trial", 5)


def job_id_for(customer_id: str, at: datetime) -> str:
    """``deploy-<customer_id>-<epoch ms>``, as the original queue named its jobs."""
    return f"deploy-{customer_id}-{int(at.timestamp() * 1000)}"


def job_event_id(job_id: str, generation: int, *parts: object) -> str:
    """The id of an event of one run of a job. A job whose attempts start over numbers them
    from 1 again: the generation keeps the new run's event ids apart from the old run's, which
    the outbox and JetStream would drop."""
    run = job_id if generation == 0 else f"{job_id}:g{generation}"
    return ":".join([run, *(str(part) for part in parts)])


def kind_for_license(deployed: bool, deploy_queued: bool) -> Kind:
    """A license deploys the customer's first instance; once one runs, or its deploy is
    queued or running, every later license updates it."""
    return UPDATE if deployed or deploy_queued else DEPLOY


@dataclass(frozen=True)
class Collapse:
    """What a new request does, given its customer's pending jobs.

    ``covered_by``: the pending job that covers the request (its id is the answer, no job is
    added), unless ``only_if_it_erases`` and that pending removal can no longer be made to
    erase; then, as when ``covered_by`` is None, a new job is added and the jobs in
    ``supersedes`` are superseded by it."""

    covered_by: str | None
    supersedes: tuple[str, ...]
    only_if_it_erases: bool = False


def collapse(kind: Kind, erase: bool, pending: Sequence[tuple[str, str]]) -> Collapse:
    """How a request of ``kind`` collapses into the customer's ``pending`` jobs (``(job_id,
    kind)``, oldest first).

    Jobs read the customer's current license when they run, so a pending deploy covers any
    later deploy or update; a pending removal covers everything (the customer is leaving), and
    an erasure asked while a removal waits makes that removal erase. A new removal supersedes
    pending deploys and updates; a new deploy or update supersedes pending updates."""
    latest = {job_kind: job_id for job_id, job_kind in pending}
    # A new job supersedes these (a pending deploy would have covered a deploy or update).
    supersedes = tuple(job_id for job_id, job_kind in pending if job_kind in (DEPLOY, UPDATE))
    if kind == DELETE:
        if DELETE in latest:
            return Collapse(latest[DELETE], supersedes, only_if_it_erases=erase)
        return Collapse(None, supersedes)
    if DELETE in latest:
        return Collapse(latest[DELETE], supersedes)
    if DEPLOY in latest:
        return Collapse(latest[DEPLOY], supersedes)
    return Collapse(None, supersedes)


def next_attempt_delay(retry_delay: timedelta, attempt: int) -> timedelta:
    """How long a job waits after its ``attempt``-th failed attempt: doubling each time."""
    return retry_delay * int(2 ** (attempt - 1))


def lease_ran_out_on_last_attempt(state: str, attempts: int, max_attempts: int) -> bool:
    """A claimable active job (its lease ran out: its worker died) that used its last
    attempt: that attempt failed, and the job is not run again."""
    return state == "active" and attempts >= max_attempts


def retry_refusal(job_id: str, state: str, newer_job_id: str | None) -> str | None:
    """Why a job may not run again, or None. Only failed jobs are retried, and not one that
    a later job of the customer overtook (a later deploy, update or delete decided what their
    instance should be now: running this one again would undo it, or queue a second job)."""
    if state != "failed":
        return f"job {job_id} is {state}; only failed jobs are retried"
    if newer_job_id is not None:
        return (
            f"job {job_id} was overtaken by the customer's later job {newer_job_id}; retry that one"
        )
    return None
