"""The deployment queue's rules, on a real Postgres: priorities, the global concurrency limit,
one job per customer, leases, backoff, collapsing, retry and cleaning. No workers run here:
the tests call the queue's own functions, as the workers do, and read what they recorded.

The queue reads the time from Postgres, so a lease running out or a backoff passing is played
by moving the job's ``lease_until`` or ``run_after`` back, not by waiting.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from contracts import CustomerClosed, LicenseIssued, decode_envelope
from libs.eventlog.store import traced_envelope
from libs.projections.apply import Recorded
from services.provisioner.leases import (
    Claimed,
    claim_next_job,
    complete_job,
    extend_lease,
    fail_job,
    record_progress,
    release_job,
)
from services.provisioner.queue import (
    JobNotRetryable,
    clean_jobs,
    enqueue,
    queue_stats,
    retry_job,
    set_paused,
)
from services.provisioner.queue_rules import DELETE, DEPLOY, UPDATE, priority_of
from services.provisioner.reactors import (
    provisioner_reactors,
    when_license_issued_queue_deployment,
)
from support import eventually, license_issued

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=30)


async def queue(pool: asyncpg.Pool, kind: str, plan: str | None, at: datetime, **kw: Any) -> str:
    async with pool.acquire() as conn, conn.transaction():
        return await enqueue(
            conn,
            customer_id=kw.get("customer_id") or str(uuid.uuid4()),
            kind=kind,  # type: ignore[arg-type]
            plan=plan,
            license_id=None,
            requested_by="test",
            at=at,
            max_attempts=kw.get("max_attempts", 3),
            erase=kw.get("erase", False),
        )


async def claim(pool: asyncpg.Pool, worker: str = "w1", concurrency: int = 100) -> Claimed | None:
    async with pool.acquire() as conn, conn.transaction():
        return await claim_next_job(
            conn, worker_id=worker, backend="local", concurrency=concurrency, lease=LEASE
        )


async def complete(pool: asyncpg.Pool, claimed: Claimed, worker: str, url: str | None) -> bool:
    async with pool.acquire() as conn, conn.transaction():
        return await complete_job(
            conn, claimed, worker, backend="local", instance_url=url, components={}
        )


async def outbox(pool: asyncpg.Pool) -> list[tuple[str, dict[str, Any]]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT envelope FROM outbox ORDER BY id")
    envelopes = [decode_envelope(r["envelope"]) for r in rows]
    return [(e.type, json.loads(bytes(e.data))) for e in envelopes]


async def job(pool: asyncpg.Pool, job_id: str) -> asyncpg.Record:
    async with pool.acquire() as conn:
        return await conn.fetchrow("SELECT * FROM queue_jobs WHERE job_id = $1", job_id)


async def run_out_lease(pool: asyncpg.Pool, job_id: str) -> None:
    """As if the job's lease ran out: its worker stopped extending it."""
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE queue_jobs SET lease_until = clock_timestamp() - interval '1 second' "
            "WHERE job_id = $1",
            job_id,
        )


async def pass_backoff(pool: asyncpg.Pool, job_id: str) -> None:
    """As if the job's backoff had passed."""
    async with pool.acquire() as conn:
        await conn.execute(
            "UPDATE queue_jobs SET run_after = clock_timestamp() WHERE job_id = $1", job_id
        )


async def database_clock(pool: asyncpg.Pool) -> datetime:
    async with pool.acquire() as conn:
        return await conn.fetchval("SELECT clock_timestamp()")


def test_priorities_follow_the_original_table() -> None:
    assert priority_of(DELETE, None) == 1
    assert priority_of(DEPLOY, "enterprise") == 1
    assert priority_of(DEPLOY, "professional") == 2
    assert priority_of(UPDATE, "enterprise") == 3
    assert priority_of(DEPLOY, "starter") == 3
    assert priority_of(DEPLOY, "trial") == 5


async def test_jobs_queued_while_paused_start_in_priority_then_age_order(pool) -> None:
    async with pool.acquire() as conn:
        await set_paused(conn, True)
    plans = ["trial", "starter", "professional", "enterprise"] * 5
    queued = {}
    for index, plan in enumerate(plans):
        job_id = await queue(pool, DEPLOY, plan, T0 + timedelta(seconds=index))
        queued[job_id] = (priority_of(DEPLOY, plan), index)
    assert await claim(pool) is None  # paused
    async with pool.acquire() as conn:
        assert (await queue_stats(conn))["waiting"] == 20
        await set_paused(conn, False)
    started = []
    while (claimed := await claim(pool)) is not None:
        started.append(claimed.job_id)
    assert len(started) == 20
    assert started == sorted(queued, key=lambda j: queued[j])
    assert [queued[j][0] for j in started][:5] == [1] * 5
    events = [t for t, _ in await outbox(pool)]
    assert events == ["DeploymentRequested"] * 20 + ["DeploymentStarted"] * 20


async def test_no_more_than_the_concurrency_limit_hold_leases(pool) -> None:
    for index in range(5):
        await queue(pool, DEPLOY, "starter", T0 + timedelta(seconds=index))
    first = await claim(pool, "a", concurrency=2)
    second = await claim(pool, "b", concurrency=2)
    assert first is not None and second is not None
    assert await claim(pool, "c", concurrency=2) is None
    assert await complete(pool, first, "a", "http://x")
    assert await claim(pool, "c", concurrency=2) is not None


async def test_one_job_at_a_time_per_customer(pool) -> None:
    customer = str(uuid.uuid4())
    first = await queue(pool, DEPLOY, "starter", T0, customer_id=customer)
    claimed = await claim(pool)
    assert claimed is not None and claimed.job_id == first
    update = await queue(pool, UPDATE, "starter", T0 + timedelta(minutes=1), customer_id=customer)
    assert update != first
    assert await claim(pool) is None  # the customer's deploy is still running
    assert await complete(pool, claimed, "w1", None)
    follow = await claim(pool)
    assert follow is not None and follow.job_id == update


async def test_a_job_whose_lease_ran_out_still_holds_its_customers_turn(pool) -> None:
    customer = str(uuid.uuid4())
    update = await queue(pool, UPDATE, "starter", T0, customer_id=customer)
    assert await claim(pool, "dead") is not None
    await run_out_lease(pool, update)
    # A delete is more urgent, but the customer's update is still active (its worker died):
    # it is claimed again first, and the delete waits for it.
    delete = await queue(pool, DELETE, None, T0 + timedelta(seconds=1), customer_id=customer)
    again = await claim(pool, "alive")
    assert again is not None and (again.job_id, again.attempt) == (update, 2)
    assert await claim(pool, "other") is None
    assert await complete(pool, again, "alive", "http://x")
    last = await claim(pool, "other")
    assert last is not None and last.job_id == delete


async def test_a_lost_lease_lets_another_worker_finish_the_job_once(pool) -> None:
    job_id = await queue(pool, DEPLOY, "starter", T0)
    first = await claim(pool, "dead")
    assert first is not None
    assert await claim(pool, "alive") is None  # lease still live
    await run_out_lease(pool, job_id)
    again = await claim(pool, "alive")
    assert again is not None and again.job_id == job_id and again.attempt == 2
    async with pool.acquire() as conn, conn.transaction():
        # The dead worker's late answers change nothing: the job is no longer its own.
        assert not await extend_lease(conn, first, "dead", LEASE)
        assert not await record_progress(conn, first, "dead", 50, "broker")
        assert not await fail_job(conn, first, "dead", "too late", timedelta(seconds=1))
        assert not await complete_job(
            conn, first, "dead", backend="local", instance_url="http://old", components={}
        )
        assert not await release_job(conn, first, "dead")
    assert await complete(pool, again, "alive", "http://new")
    done = await job(pool, job_id)
    assert (done["state"], done["attempts"]) == ("completed", 2)
    events = await outbox(pool)
    assert [d["instance_url"] for t, d in events if t == "DeploymentSucceeded"] == ["http://new"]
    assert not [d for t, d in events if t in ("DeploymentFailed", "DeploymentProgressed")]


async def test_a_claim_racing_the_old_workers_completion_leaves_the_job_completed(pool) -> None:
    job_id = await queue(pool, DEPLOY, "starter", T0)
    old = await claim(pool, "old")
    assert old is not None
    await run_out_lease(pool, job_id)
    async with pool.acquire() as finishing, pool.acquire() as watcher:
        # The old worker finishes just as its lease runs out; its transaction has not
        # committed when another worker's claim reads the job (active, lease run out) and goes
        # to take it.
        finished = finishing.transaction()
        await finished.start()
        assert await complete_job(
            finishing, old, "old", backend="local", instance_url="http://old", components={}
        )
        racing = asyncio.create_task(claim(pool, "new"))
        await eventually(
            lambda: watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query LIKE 'UPDATE queue_jobs%'"
            ),
            what="the claim waiting for the job's row",
        )
        await finished.commit()
        assert await racing is None
    done = await job(pool, job_id)
    assert (done["state"], done["attempts"], done["lease_owner"]) == ("completed", 1, None)
    assert [t for t, _ in await outbox(pool)].count("DeploymentStarted") == 1


async def test_leases_are_timed_by_the_database_clock(pool) -> None:
    job_id = await queue(pool, DEPLOY, "starter", T0)
    before = await database_clock(pool)
    claimed = await claim(pool)
    after = await database_clock(pool)
    assert claimed is not None
    assert before + LEASE <= (await job(pool, job_id))["lease_until"] <= after + LEASE
    longer = timedelta(minutes=10)
    before = await database_clock(pool)
    async with pool.acquire() as conn, conn.transaction():
        assert await extend_lease(conn, claimed, "w1", longer)
    after = await database_clock(pool)
    assert before + longer <= (await job(pool, job_id))["lease_until"] <= after + longer


async def test_a_worker_shutting_down_gives_its_attempt_back(pool) -> None:
    job_id = await queue(pool, DEPLOY, "starter", T0)
    first = await claim(pool, "leaving")
    assert first is not None and first.attempt == 1
    async with pool.acquire() as conn, conn.transaction():
        assert await record_progress(conn, first, "leaving", 10, "database")
        assert await release_job(conn, first, "leaving")
    row = await job(pool, job_id)
    assert (row["state"], row["attempts"], row["lease_owner"]) == ("waiting", 0, None)
    assert json.loads(row["attempt_log"])[0]["outcome"] == "released"
    again = await claim(pool, "staying")
    assert again is not None and (again.job_id, again.attempt) == (job_id, 1)
    async with pool.acquire() as conn, conn.transaction():
        assert await record_progress(conn, again, "staying", 10, "database")
    # The second run's events are not dropped as repeats of the first run's.
    events = await outbox(pool)
    assert [d["worker_id"] for t, d in events if t == "DeploymentStarted"] == ["leaving", "staying"]
    assert [t for t, _ in events].count("DeploymentProgressed") == 2


async def test_failures_back_off_exponentially_then_fail_and_retry_starts_afresh(pool) -> None:
    job_id = await queue(pool, DEPLOY, "starter", T0, max_attempts=3)
    delay = timedelta(seconds=60)
    for attempt in (1, 2):
        claimed = await claim(pool)
        assert claimed is not None and claimed.attempt == attempt
        async with pool.acquire() as conn, conn.transaction():
            assert await fail_job(conn, claimed, "w1", f"boom {attempt}", delay)
        row = await job(pool, job_id)
        assert row["state"] == "delayed"
        failed_at = datetime.fromisoformat(json.loads(row["attempt_log"])[-1]["finished_at"])
        assert row["run_after"] == failed_at + delay * 2 ** (attempt - 1)
        assert await claim(pool) is None  # backing off
        await pass_backoff(pool, job_id)
    last = await claim(pool)
    assert last is not None and last.attempt == 3
    async with pool.acquire() as conn, conn.transaction():
        assert await fail_job(conn, last, "w1", "boom 3", delay)
    row = await job(pool, job_id)
    assert (row["state"], row["attempts"], row["failed_reason"]) == ("failed", 3, "boom 3")
    assert [a["outcome"] for a in json.loads(row["attempt_log"])] == ["failed"] * 3
    failed = [d for t, d in await outbox(pool) if t == "DeploymentFailed"]
    assert [(d["attempt"], d["will_retry"]) for d in failed] == [(1, True), (2, True), (3, False)]
    await pass_backoff(pool, job_id)
    assert await claim(pool) is None

    async with pool.acquire() as conn, conn.transaction():
        await retry_job(conn, job_id, "admin")
    again = await claim(pool)
    assert again is not None and again.attempt == 1
    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(JobNotRetryable):
            await retry_job(conn, job_id, "admin")  # it is running, not failed


async def test_a_retried_jobs_new_run_is_recorded_under_new_event_ids(pool) -> None:
    job_id = await queue(pool, DEPLOY, "starter", T0, max_attempts=1)
    for run in (1, 2):
        claimed = await claim(pool)
        assert claimed is not None and claimed.attempt == 1
        async with pool.acquire() as conn, conn.transaction():
            assert await record_progress(conn, claimed, "w1", 10, "database")
            assert await fail_job(conn, claimed, "w1", f"boom {run}", timedelta(seconds=1))
            if run == 1:
                await retry_job(conn, job_id, "admin")
    async with pool.acquire() as conn:
        ids = await conn.fetch("SELECT event_id FROM outbox ORDER BY id")
    assert len({r["event_id"] for r in ids}) == len(ids)
    assert [(t, d.get("attempt"), d.get("error")) for t, d in await outbox(pool)] == [
        ("DeploymentRequested", None, None),
        ("DeploymentStarted", 1, None),
        ("DeploymentProgressed", None, None),
        ("DeploymentFailed", 1, "boom 1"),
        ("DeploymentRetried", None, None),
        ("DeploymentStarted", 1, None),
        ("DeploymentProgressed", None, None),
        ("DeploymentFailed", 1, "boom 2"),
    ]


async def test_pending_jobs_are_collapsed(pool) -> None:
    customer = str(uuid.uuid4())
    deploy = await queue(pool, DEPLOY, "trial", T0, customer_id=customer)
    # A deploy waiting runs with the newest license: an update adds nothing.
    assert await queue(pool, UPDATE, "starter", T0, customer_id=customer) == deploy
    delete = await queue(pool, DELETE, None, T0 + timedelta(seconds=1), customer_id=customer)
    assert (await job(pool, deploy))["state"] == "superseded"
    assert (await job(pool, deploy))["superseded_by"] == delete
    # The customer is leaving: no update or second delete is queued.
    assert await queue(pool, UPDATE, "starter", T0, customer_id=customer) == delete
    assert await queue(pool, DELETE, None, T0, customer_id=customer) == delete

    other = str(uuid.uuid4())
    first = await queue(pool, DEPLOY, "starter", T0, customer_id=other)
    running = {(await claim(pool)).job_id for _ in range(2)}
    assert running == {first, delete}
    one = await queue(pool, UPDATE, "starter", T0 + timedelta(seconds=2), customer_id=other)
    two = await queue(pool, UPDATE, "professional", T0 + timedelta(seconds=3), customer_id=other)
    assert (await job(pool, one))["state"] == "superseded"
    assert (await job(pool, two))["state"] == "waiting"
    superseded = [d for t, d in await outbox(pool) if t == "DeploymentSuperseded"]
    assert {(d["job_id"], d["superseded_by"]) for d in superseded} == {
        (deploy, delete),
        (one, two),
    }


async def test_job_ids_name_the_customer_and_time_and_stay_unique(pool) -> None:
    customer = str(uuid.uuid4())
    first = await queue(pool, DELETE, None, T0, customer_id=customer)
    assert first == f"deploy-{customer}-{int(T0.timestamp() * 1000)}"
    claimed = await claim(pool)
    assert claimed is not None
    second = await queue(pool, DEPLOY, "starter", T0, customer_id=customer)
    assert second == f"deploy-{customer}-{int(T0.timestamp() * 1000) + 1}"


async def test_clean_removes_finished_jobs_and_records_it(pool) -> None:
    job_id = await queue(pool, DEPLOY, "starter", T0)
    claimed = await claim(pool)
    assert claimed is not None
    assert await complete(pool, claimed, "w1", None)
    finished = (await job(pool, job_id))["finished_on"]
    async with pool.acquire() as conn, conn.transaction():
        assert await clean_jobs(conn, "completed", finished, "admin") == 0  # not older
        assert await clean_jobs(conn, "completed", finished + timedelta(seconds=1), "admin") == 1
    assert await job(pool, job_id) is None
    assert [d["job_id"] for t, d in await outbox(pool) if t == "DeploymentJobRemoved"] == [job_id]


async def test_a_license_after_the_account_closed_deploys_nothing(pool) -> None:
    customer = str(uuid.uuid4())
    [reactors] = provisioner_reactors(max_attempts=3, wake=lambda: None)

    async def react(seq: int, event: CustomerClosed | LicenseIssued) -> None:
        envelope = traced_envelope(event, customer_id=customer)
        async with pool.acquire() as conn, conn.transaction():
            await reactors.handlers[type(event)](conn, Recorded(seq, envelope, event))

    # The closure reaches the provisioner before any license did; its delete runs.
    await react(1, CustomerClosed(customer_id=customer, closed_by="customer"))
    delete = await claim(pool)
    assert delete is not None and delete.kind == DELETE
    assert await complete(pool, delete, "w1", None)
    await react(2, license_issued(customer))
    async with pool.acquire() as conn:
        jobs = await conn.fetch("SELECT kind FROM queue_jobs WHERE customer_id = $1", customer)
        closed = await conn.fetchval(
            "SELECT closed FROM customer_licenses WHERE customer_id = $1", customer
        )
    assert [j["kind"] for j in jobs] == [DELETE]
    assert closed is True


async def test_a_failed_job_overtaken_by_a_later_one_is_not_retried(pool) -> None:
    customer = str(uuid.uuid4())
    old = await queue(pool, DEPLOY, "starter", T0, customer_id=customer, max_attempts=1)
    claimed = await claim(pool)
    assert claimed is not None and claimed.job_id == old
    async with pool.acquire() as conn, conn.transaction():
        assert await fail_job(conn, claimed, "w1", "boom", timedelta(seconds=1))
    # The customer leaves: the delete that follows must not be undone by a retried deploy.
    removal = await queue(pool, DELETE, None, T0 + timedelta(minutes=1), customer_id=customer)
    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(JobNotRetryable, match=removal):
            await retry_job(conn, old, "admin")
    assert (await job(pool, old))["state"] == "failed"
    assert (await job(pool, removal))["state"] == "waiting"


async def test_a_closure_asking_for_erasure_queues_a_removal_that_erases(pool) -> None:
    """CustomerClosed version 2's ``erase`` reaches the job the worker runs and the log's
    DeploymentRequested; a later erasure request makes a pending keeping removal erase."""
    keeping, erasing = str(uuid.uuid4()), str(uuid.uuid4())
    [reactors] = provisioner_reactors(max_attempts=3, wake=lambda: None)

    async def react(seq: int, event: CustomerClosed) -> None:
        envelope = traced_envelope(event, customer_id=event.customer_id)
        async with pool.acquire() as conn, conn.transaction():
            await reactors.handlers[CustomerClosed](conn, Recorded(seq, envelope, event))

    await react(1, CustomerClosed(customer_id=keeping, closed_by="customer"))
    await react(2, CustomerClosed(customer_id=erasing, closed_by="customer", erase=True))
    requested = {d["customer_id"]: d for t, d in await outbox(pool) if t == "DeploymentRequested"}
    assert requested[keeping]["erase"] is False and requested[erasing]["erase"] is True
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT customer_id, job_id, data FROM queue_jobs")
    data = {r["customer_id"]: json.loads(r["data"]) for r in rows}
    assert "erase" not in data[keeping] and data[erasing]["erase"] is True

    # The customer whose removal waits asks for erasure after all: the same job erases.
    pending = next(r["job_id"] for r in rows if r["customer_id"] == keeping)
    again = await queue(pool, DELETE, None, T0, customer_id=keeping, erase=True)
    assert again == pending
    claimed = [await claim(pool), await claim(pool)]
    erase_of = {c.customer_id: c.data.get("erase") for c in claimed if c is not None}
    assert erase_of == {keeping: True, erasing: True}

    # A removal that keeps the data is already running when erasure is asked: a new one erases.
    late = str(uuid.uuid4())
    first = await queue(pool, DELETE, None, T0, customer_id=late)
    running = await claim(pool)
    assert running is not None and running.job_id == first and not running.data.get("erase")
    second = await queue(pool, DELETE, None, T0, customer_id=late, erase=True)
    assert second != first
    async with pool.acquire() as conn:
        data = json.loads(
            await conn.fetchval("SELECT data FROM queue_jobs WHERE job_id = $1", second)
        )
    assert data["erase"] is True


async def test_the_license_handler_called_alone_deploys_then_updates(pool) -> None:
    """The reactor's handler is a module-level function: called with its arguments, no table."""
    customer = str(uuid.uuid4())
    woken: list[str] = []

    async def issue(seq: int) -> None:
        event = license_issued(customer)
        envelope = traced_envelope(event, customer_id=customer)
        async with pool.acquire() as conn, conn.transaction():
            await when_license_issued_queue_deployment(
                conn,
                Recorded(seq, envelope, event),
                max_attempts=3,
                wake=lambda: woken.append(customer),
            )

    await issue(1)
    first = await claim(pool)
    assert first is not None and first.kind == DEPLOY
    assert await complete(pool, first, "w1", None)
    await issue(2)
    second = await claim(pool)
    assert second is not None and second.kind == UPDATE
    assert woken == [customer, customer]
