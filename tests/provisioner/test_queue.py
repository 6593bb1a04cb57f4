"""The deployment queue's rules, on a real Postgres: priorities, the global concurrency limit,
one job per customer, leases, backoff, collapsing, retry and cleaning. No workers run here:
the tests call the queue's own functions, as the workers do, and read what they recorded.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from contracts import decode_envelope
from libs.db import create_pool, migrate, service_migrations
from services.provisioner.queue import (
    DELETE,
    DEPLOY,
    UPDATE,
    JobNotRetryable,
    claim_next_job,
    clean_jobs,
    complete_job,
    enqueue,
    extend_lease,
    fail_job,
    priority_of,
    queue_stats,
    retry_job,
    set_paused,
)
from support import create_database

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=30)


@pytest.fixture
async def pool(postgres_server_url: str) -> AsyncIterator[asyncpg.Pool]:
    url = await create_database(postgres_server_url)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, "provisioner", service_migrations("services.provisioner.migrations"))
    finally:
        await conn.close()
    pool = await create_pool(url, "provisioner", max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


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
        )


async def claim(pool: asyncpg.Pool, now: datetime, worker: str = "w1", concurrency: int = 100):
    async with pool.acquire() as conn, conn.transaction():
        return await claim_next_job(
            conn, worker_id=worker, backend="local", now=now, concurrency=concurrency, lease=LEASE
        )


async def outbox(pool: asyncpg.Pool) -> list[tuple[str, dict[str, Any]]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT envelope FROM outbox ORDER BY id")
    envelopes = [decode_envelope(r["envelope"]) for r in rows]
    return [(e.type, json.loads(bytes(e.data))) for e in envelopes]


async def job(pool: asyncpg.Pool, job_id: str) -> asyncpg.Record:
    async with pool.acquire() as conn:
        return await conn.fetchrow("SELECT * FROM queue_jobs WHERE job_id = $1", job_id)


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
    assert await claim(pool, T0 + timedelta(minutes=1)) is None  # paused
    async with pool.acquire() as conn:
        assert (await queue_stats(conn))["waiting"] == 20
        await set_paused(conn, False)
    started = []
    while (claimed := await claim(pool, T0 + timedelta(minutes=1))) is not None:
        started.append(claimed.job_id)
    assert len(started) == 20
    assert started == sorted(queued, key=lambda j: queued[j])
    assert [queued[j][0] for j in started][:5] == [1] * 5
    events = [t for t, _ in await outbox(pool)]
    assert events == ["DeploymentRequested"] * 20 + ["DeploymentStarted"] * 20


async def test_no_more_than_the_concurrency_limit_hold_leases(pool) -> None:
    for index in range(5):
        await queue(pool, DEPLOY, "starter", T0 + timedelta(seconds=index))
    now = T0 + timedelta(minutes=1)
    first = await claim(pool, now, "a", concurrency=2)
    second = await claim(pool, now, "b", concurrency=2)
    assert first is not None and second is not None
    assert await claim(pool, now, "c", concurrency=2) is None
    async with pool.acquire() as conn, conn.transaction():
        assert await complete_job(
            conn, first, "a", now, backend="local", instance_url="http://x", components={}
        )
    assert await claim(pool, now, "c", concurrency=2) is not None


async def test_one_job_at_a_time_per_customer(pool) -> None:
    customer = str(uuid.uuid4())
    first = await queue(pool, DEPLOY, "starter", T0, customer_id=customer)
    now = T0 + timedelta(minutes=1)
    claimed = await claim(pool, now)
    assert claimed is not None and claimed.job_id == first
    update = await queue(pool, UPDATE, "starter", now, customer_id=customer)
    assert update != first
    assert await claim(pool, now) is None  # the customer's deploy is still running
    async with pool.acquire() as conn, conn.transaction():
        await complete_job(
            conn, claimed, "w1", now, backend="local", instance_url=None, components={}
        )
    follow = await claim(pool, now)
    assert follow is not None and follow.job_id == update


async def test_a_lost_lease_lets_another_worker_finish_the_job_once(pool) -> None:
    job_id = await queue(pool, DEPLOY, "starter", T0)
    first = await claim(pool, T0, "dead")
    assert first is not None
    assert await claim(pool, T0 + LEASE / 2, "alive") is None  # lease still live
    later = T0 + LEASE + timedelta(seconds=1)
    again = await claim(pool, later, "alive")
    assert again is not None and again.job_id == job_id and again.attempt == 2
    async with pool.acquire() as conn, conn.transaction():
        # The dead worker's late answers change nothing: the job is no longer its own.
        assert not await extend_lease(conn, first, "dead", later + LEASE)
        assert not await complete_job(
            conn, first, "dead", later, backend="local", instance_url="http://old", components={}
        )
        assert await complete_job(
            conn, again, "alive", later, backend="local", instance_url="http://new", components={}
        )
    done = await job(pool, job_id)
    assert done["state"] == "completed"
    succeeded = [d for t, d in await outbox(pool) if t == "DeploymentSucceeded"]
    assert [d["instance_url"] for d in succeeded] == ["http://new"]


async def test_failures_back_off_exponentially_then_fail_and_retry_starts_afresh(pool) -> None:
    job_id = await queue(pool, DEPLOY, "starter", T0, max_attempts=3)
    delay = timedelta(seconds=60)
    now = T0
    for attempt in (1, 2):
        claimed = await claim(pool, now)
        assert claimed is not None and claimed.attempt == attempt
        async with pool.acquire() as conn, conn.transaction():
            assert await fail_job(conn, claimed, "w1", now, f"boom {attempt}", delay)
        row = await job(pool, job_id)
        assert row["state"] == "delayed"
        assert row["run_after"] == now + delay * 2 ** (attempt - 1)
        assert await claim(pool, row["run_after"] - timedelta(milliseconds=1)) is None
        now = row["run_after"]
    last = await claim(pool, now)
    assert last is not None and last.attempt == 3
    async with pool.acquire() as conn, conn.transaction():
        await fail_job(conn, last, "w1", now, "boom 3", delay)
    row = await job(pool, job_id)
    assert (row["state"], row["attempts"], row["failed_reason"]) == ("failed", 3, "boom 3")
    assert [a["outcome"] for a in json.loads(row["attempt_log"])] == ["failed"] * 3
    failed = [d for t, d in await outbox(pool) if t == "DeploymentFailed"]
    assert [(d["attempt"], d["will_retry"]) for d in failed] == [(1, True), (2, True), (3, False)]
    assert await claim(pool, now + timedelta(days=1)) is None

    async with pool.acquire() as conn, conn.transaction():
        await retry_job(conn, job_id, now, "admin")
    again = await claim(pool, now)
    assert again is not None and again.attempt == 1
    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(JobNotRetryable):
            await retry_job(conn, job_id, now, "admin")  # it is running, not failed


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
    running = {(await claim(pool, T0 + timedelta(minutes=1))).job_id for _ in range(2)}
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
    claimed = await claim(pool, T0)
    assert claimed is not None
    second = await queue(pool, DEPLOY, "starter", T0, customer_id=customer)
    assert second == f"deploy-{customer}-{int(T0.timestamp() * 1000) + 1}"


async def test_clean_removes_finished_jobs_and_records_it(pool) -> None:
    job_id = await queue(pool, DEPLOY, "starter", T0)
    claimed = await claim(pool, T0)
    assert claimed is not None
    async with pool.acquire() as conn, conn.transaction():
        await complete_job(
            conn, claimed, "w1", T0, backend="local", instance_url=None, components={}
        )
        assert await clean_jobs(conn, "completed", T0, "admin") == 0  # not older than T0
        assert await clean_jobs(conn, "completed", T0 + timedelta(seconds=1), "admin") == 1
    assert await job(pool, job_id) is None
    assert [d["job_id"] for t, d in await outbox(pool) if t == "DeploymentJobRemoved"] == [job_id]
