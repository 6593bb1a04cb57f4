"""The supervisor every long-lived task runs under, alone and inside a real platform.

Issue 12 found runners and loops that died and stayed dead under a green health check. Here a
task crashes, ends early, hangs or falls behind, and the supervisor restarts it and readiness
says so while it lasts.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from contracts import CustomerSignedUp
from libs.config import ServiceSettings
from libs.db.postgres import Connection
from libs.eventlog.store import EventStore
from libs.projections.apply import Projection, Recorded
from libs.runtime.platform import Platform
from libs.runtime.scheduling import run_every
from libs.runtime.supervision import Backoff, Supervisor, TaskState, Worker, restart_counter
from services.signup.app import SIGNUP
from support import eventually

QUICK = Backoff(initial=0.05, cap=0.2, jitter=0.5, healthy_after=60)


async def test_a_crashing_task_is_restarted_with_backoff_and_counted() -> None:
    registry = CollectorRegistry()
    supervisor = Supervisor("svc", restart_counter(registry), QUICK)
    runs = 0
    healthy = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise RuntimeError(f"crash {runs}")
        healthy.set()
        await asyncio.Event().wait()

    task = supervisor.spawn("flaky", flaky)
    await asyncio.wait_for(healthy.wait(), 5)
    assert (task.restarts, task.state, runs) == (3, TaskState.RUNNING, 4)
    assert task.last_error == "RuntimeError: crash 3"
    sample = registry.get_sample_value(
        "iotistic_task_restarts_total", {"owner": "svc", "task": "flaky"}
    )
    assert sample == 3
    ok, detail = supervisor.health()
    assert ok and detail["flaky"]["restarts"] == 3
    await supervisor.stop(1)
    assert task.state is TaskState.STOPPED


async def test_a_task_waiting_to_be_restarted_is_not_healthy() -> None:
    supervisor = Supervisor("svc", backoff=Backoff(initial=30, cap=30, jitter=0))

    async def broken() -> None:
        raise ValueError("bad config")

    supervisor.spawn("broken", broken)
    _, detail = await eventually(
        lambda: asyncio.sleep(0, supervisor.health()), lambda h: not h[0], what="unhealthy"
    )
    assert detail["broken"]["state"] == "restarting"
    assert detail["broken"]["last_error"] == "ValueError: bad config"
    await supervisor.stop(1)


async def test_a_task_that_ends_on_its_own_is_started_again() -> None:
    supervisor = Supervisor("svc", backoff=QUICK)
    starts = 0

    async def quits() -> None:
        nonlocal starts
        starts += 1

    task = supervisor.spawn("quits", quits)
    await eventually(lambda: asyncio.sleep(0, starts), lambda n: n >= 3, what="three starts")
    assert task.last_error == "ended while the process was running"
    await supervisor.stop(1)
    stopped_at = starts
    await asyncio.sleep(0.3)
    assert starts == stopped_at  # nothing starts after stop


async def test_a_scheduler_whose_pass_hangs_is_stuck_and_one_that_fails_is_restarted() -> None:
    supervisor = Supervisor("svc", backoff=QUICK)
    release = asyncio.Event()
    passes = 0

    async def hangs_once() -> int:
        nonlocal passes
        passes += 1
        if passes == 2:
            await release.wait()
        return 0

    task = supervisor.spawn("hangs", lambda: run_every(0.05, "hangs", hangs_once), stuck_after=0.3)
    _, detail = await eventually(
        lambda: asyncio.sleep(0, supervisor.health()), lambda h: not h[0], what="stuck"
    )
    assert detail["hangs"]["stuck_seconds"] >= 0.3 and task.state is TaskState.RUNNING
    release.set()
    await eventually(lambda: asyncio.sleep(0, supervisor.health()), lambda h: h[0], what="beats")

    async def raises() -> int:
        raise KeyError("a bug, not an outage")

    failing = supervisor.spawn("raises", lambda: run_every(0.05, "raises", raises))
    await eventually(lambda: asyncio.sleep(0, failing.restarts), lambda n: n >= 2, what="restart")
    assert failing.last_error == "KeyError: 'a bug, not an outage'"
    await supervisor.stop(1)


# --- inside a platform ---------------------------------------------------------------------------


@pytest.fixture
async def fresh(fresh_log: Any) -> tuple[ServiceSettings, EventStore]:
    return await fresh_log(projection_stall_seconds=1)


async def test_readiness_is_503_while_a_worker_is_down_and_200_once_it_runs(fresh) -> None:
    settings, _ = fresh
    crashes_left = 3

    async def crashes_at_first() -> None:
        nonlocal crashes_left
        if crashes_left:
            crashes_left -= 1
            raise RuntimeError("not yet")
        await asyncio.Event().wait()

    signup = dataclasses.replace(
        SIGNUP, workers=lambda _: [Worker("crashes at first", crashes_at_first)]
    )
    platform = Platform.from_settings(settings, [signup])
    await platform.start()
    try:
        await platform.wait_started()
        await eventually(
            platform.readiness,
            lambda r: r[1]["services"]["signup"]["tasks"]["crashes at first"]["restarts"] >= 1,
            what="a restart shown",
        )
        await eventually(platform.readiness, lambda r: r[0], what="ready once it runs")
        tasks = (await platform.readiness())[1]["services"]["signup"]["tasks"]
        assert tasks["crashes at first"] == {
            "state": "running",
            "restarts": 3,
            "last_error": "RuntimeError: not yet",
        }
        assert tasks["projection:accounts"]["state"] == "running"
        sample = platform.registry.get_sample_value(
            "iotistic_task_restarts_total", {"owner": "signup", "task": "crashes at first"}
        )
        assert sample == 3
    finally:
        await platform.stop()


async def test_a_projection_that_stops_moving_behind_the_log_is_not_ready(fresh) -> None:
    settings, store = fresh
    release = asyncio.Event()

    async def hangs(conn: Connection, r: Recorded[CustomerSignedUp]) -> None:
        await release.wait()

    stuck = Projection(name="accounts", handlers={CustomerSignedUp: hangs}, tables=("accounts",))
    signup = dataclasses.replace(SIGNUP, projections=(stuck,), workers=lambda _: [])
    platform = Platform.from_settings(settings, [signup])
    await platform.start()
    try:
        await platform.wait_started()
        await eventually(platform.readiness, lambda r: r[0], what="ready before any event")
        event = CustomerSignedUp(
            customer_id="c-1",
            email="stall@example.com",
            email_display="stall@example.com",
            company_name="Stall",
            plan="starter",
            signed_up_at=datetime.now(UTC),
            trial_days=14,
        )
        await store.publish(event, customer_id="c-1", key="stall")
        _, detail = await eventually(platform.readiness, lambda r: not r[0], what="stalled")
        entry = detail["services"]["signup"]["projections"]["accounts"]
        assert entry["lag"] == 1 and entry["stalled_seconds"] >= 1, entry
        release.set()
        await eventually(platform.readiness, lambda r: r[0], what="ready once it moves")
    finally:
        release.set()
        await platform.stop()


async def test_a_migration_that_fails_is_named_by_readiness_and_retried(fresh) -> None:
    settings, _ = fresh
    # Something in the way of the service's first migration: a table of that name, by hand.
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute("CREATE SCHEMA signup; CREATE TABLE signup.accounts (by_hand int)")
        platform = Platform.from_settings(settings, [SIGNUP])
        await platform.start()
        try:
            _, detail = await eventually(
                platform.readiness,
                lambda r: "migrations" in str(r[1]["services"]["signup"]["database"]),
                what="readiness naming the failed migration",
            )
            database = detail["services"]["signup"]["database"]
            assert database["ok"] is False
            assert "001_accounts.sql failed" in database["error"], database
            # The operator removes what was in the way: the service carries on by itself.
            await conn.execute("DROP TABLE signup.accounts")
            await eventually(platform.readiness, lambda r: r[0], timeout=60, what="ready")
        finally:
            await platform.stop()
    finally:
        await conn.close()
