"""The platform's capacity for instances: the local backend's bounds measured against the real
Postgres (its ``max_connections``) and this machine's memory; the queue holding new deploys
while the platform is full, and only those; and the record of a change on the real log, once.

The queue tests call the queue's own functions, as the workers do (see ``test_queue.py``).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import psutil

from contracts import decode_envelope
from libs.eventlog.store import EventStore
from libs.projections.apply import Recorded
from services.provisioner.backends.base import Capacity, tightest
from services.provisioner.backends.local.backend import LocalBackend
from services.provisioner.backends.local.capacity import MIB, connection_capacity, memory_capacity
from services.provisioner.capacity import CapacityState, record_capacity_change
from services.provisioner.leases import Claimed, claim_next_job, complete_job
from services.provisioner.projections import when_instance_capacity_changed_remember_it
from services.provisioner.queue import enqueue, instances_held, waiting_for_capacity
from services.provisioner.queue_rules import DELETE, DEPLOY, UPDATE
from services.provisioner.settings import ProvisionerSettings

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=30)


# --- the arithmetic -----------------------------------------------------------------------------


def test_connections_left_after_the_reserves_are_shared_among_instances() -> None:
    # 600 allowed, 3 for superusers, 100 for the control plane, 2 for each instance.
    assert connection_capacity(600, 3, 100, 2) == 248
    # The embedded default before issue 13: 200 allowed, ~2 per instance.
    assert connection_capacity(200, 3, 100, 2) == 48
    assert connection_capacity(200, 3, 100, 1) == 97
    # Reserves larger than the server: no room, never a negative count.
    assert connection_capacity(50, 3, 100, 2) == 0


def test_memory_counts_what_is_free_and_what_running_instances_hold() -> None:
    gib = 1024 * MIB
    # 24 GiB available, 90 % of it for instances at 110 MiB each.
    assert memory_capacity(24 * gib, 0, 0.9, 110 * MIB) == 201
    # Instances already running hold memory that is not "available" but is theirs.
    assert memory_capacity(14 * gib, 10 * gib, 0.9, 110 * MIB) == 201
    assert memory_capacity(0, 0, 0.9, 110 * MIB) == 0


def test_the_tightest_bound_sets_the_capacity_and_is_named() -> None:
    capacity = tightest({"connections": 248, "memory": 201, "setting": None})
    assert capacity == Capacity(
        limit=201, limited_by="memory", bounds={"connections": 248, "memory": 201}
    )
    assert tightest({"connections": 248, "memory": 201, "setting": 50}).limited_by == "setting"
    assert tightest({"setting": None}) == Capacity(limit=None)


# --- the local backend against the real Postgres ------------------------------------------------


def local_backend(database_url: str, **settings: Any) -> LocalBackend:
    config = ProvisionerSettings(database_url=database_url, provisioner_secret="p" * 40, **settings)

    def no_pool() -> asyncpg.Pool:
        raise AssertionError("capacity needs no pool of the provisioner's")

    return LocalBackend(config, no_pool)


async def server_limits(database_url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(database_url)
    try:
        return (
            int(await conn.fetchval("SHOW max_connections")),
            int(await conn.fetchval("SHOW superuser_reserved_connections"))
            + int(
                await conn.fetchval(
                    "SELECT coalesce(current_setting('reserved_connections', true), '0')"
                )
            ),
        )
    finally:
        await conn.close()


async def test_the_local_backend_reads_max_connections_of_the_instances_postgres(
    database_url: str,
) -> None:
    allowed, reserved = await server_limits(database_url)
    backend = local_backend(
        database_url, local_control_plane_connections=10, local_connections_per_instance=3
    )
    capacity = await backend.capacity()
    assert capacity.bounds["connections"] == (allowed - reserved - 10) // 3
    # Memory: this machine's, at the default budget (nothing runs here yet).
    expected = int(psutil.virtual_memory().available * 0.9) // (80 * MIB)
    assert abs(capacity.bounds["memory"] - expected) <= max(2, expected // 20)
    assert capacity.limit == min(capacity.bounds.values())
    assert "setting" not in capacity.bounds


async def test_each_bound_of_the_local_backend_can_be_the_one_that_limits(
    database_url: str,
) -> None:
    allowed, reserved = await server_limits(database_url)
    # The control plane's reserve takes every connection: no instance fits.
    starved = await local_backend(database_url, local_control_plane_connections=allowed).capacity()
    assert (starved.limit, starved.limited_by) == (0, "connections")
    # An instance larger than this machine's memory.
    huge = await local_backend(
        database_url, local_memory_per_instance_mib=10 * 1024 * 1024
    ).capacity()
    assert (huge.limit, huge.limited_by) == (0, "memory")
    # The operator's MAX_INSTANCES, below both.
    capped = await local_backend(database_url, max_instances=1).capacity()
    assert (capped.limit, capped.limited_by) == (1, "setting")
    assert capped.bounds["connections"] == (allowed - reserved - 100) // 2


async def test_a_database_that_does_not_answer_keeps_the_last_connection_bound(
    database_url: str,
) -> None:
    backend = local_backend(database_url)
    measured = (await backend.capacity()).bounds["connections"]
    backend._settings = ProvisionerSettings(  # the server moved away (a port nobody serves)
        database_url="postgresql://postgres@127.0.0.1:1/nothing", provisioner_secret="p" * 40
    )
    assert (await backend.capacity()).bounds["connections"] == measured


# --- the queue while the platform is full -------------------------------------------------------


async def queue(pool: asyncpg.Pool, kind: str, customer_id: str, plan: str, at: datetime) -> str:
    async with pool.acquire() as conn, conn.transaction():
        return await enqueue(
            conn,
            customer_id=customer_id,
            kind=kind,  # type: ignore[arg-type]
            plan=plan,
            license_id=None,
            requested_by="test",
            at=at,
            max_attempts=3,
        )


async def claim(pool: asyncpg.Pool, capacity: int | None) -> Claimed | None:
    async with pool.acquire() as conn, conn.transaction():
        return await claim_next_job(
            conn,
            worker_id="w1",
            backend="local",
            concurrency=100,
            lease=LEASE,
            capacity=capacity,
        )


async def complete(pool: asyncpg.Pool, job: Claimed) -> None:
    async with pool.acquire() as conn, conn.transaction():
        assert await complete_job(
            conn, job, "w1", backend="local", instance_url="http://x", components={}
        )


async def events_of(pool: asyncpg.Pool, event_type: str) -> list[dict[str, Any]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT envelope FROM outbox ORDER BY id")
    envelopes = [decode_envelope(r["envelope"]) for r in rows]
    return [json.loads(bytes(e.data)) for e in envelopes if e.type == event_type]


async def deployed(pool: asyncpg.Pool, plan: str, at: datetime, capacity: int) -> str:
    customer_id = str(uuid.uuid4())
    await queue(pool, DEPLOY, customer_id, plan, at)
    job = await claim(pool, capacity)
    assert job is not None and job.customer_id == customer_id
    await complete(pool, job)
    return customer_id


async def test_a_full_platform_holds_a_new_deploy_once_recorded_and_never_failed(
    pool: asyncpg.Pool,
) -> None:
    first = await deployed(pool, "starter", T0, capacity=1)
    second = str(uuid.uuid4())
    held = await queue(pool, DEPLOY, second, "starter", T0 + timedelta(seconds=1))
    for _ in range(3):
        assert await claim(pool, capacity=1) is None
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM queue_jobs WHERE job_id = $1", held)
        assert (await instances_held(conn), await waiting_for_capacity(conn)) == (1, 1)
    assert (row["state"], row["attempts"]) == ("waiting", 0)
    assert row["waiting_for_capacity_since"] is not None
    assert await events_of(pool, "DeploymentWaitingForCapacity") == [
        {"customer_id": second, "job_id": held, "running": 1, "capacity": 1}
    ]
    assert await events_of(pool, "DeploymentFailed") == []
    # An update of the running instance goes ahead of it (updates are never held) ...
    await queue(pool, UPDATE, first, "professional", T0 + timedelta(seconds=2))
    update = await claim(pool, capacity=1)
    assert update is not None and (update.kind, update.customer_id) == (UPDATE, first)
    await complete(pool, update)
    # ... and so does a delete; until it is done the instance still holds its slot.
    await queue(pool, DELETE, first, "professional", T0 + timedelta(seconds=3))
    delete = await claim(pool, capacity=1)
    assert delete is not None and delete.kind == DELETE
    assert await claim(pool, capacity=1) is None
    await complete(pool, delete)
    # Room again: the held deploy starts by itself.
    started = await claim(pool, capacity=1)
    assert started is not None and started.job_id == held
    async with pool.acquire() as conn:
        assert await waiting_for_capacity(conn) == 0
    assert len(await events_of(pool, "DeploymentWaitingForCapacity")) == 1


async def test_held_deploys_start_in_priority_order_when_capacity_is_raised(
    pool: asyncpg.Pool,
) -> None:
    await deployed(pool, "starter", T0, capacity=1)
    trial = await queue(pool, DEPLOY, str(uuid.uuid4()), "trial", T0 + timedelta(seconds=1))
    enterprise = await queue(
        pool, DEPLOY, str(uuid.uuid4()), "enterprise", T0 + timedelta(seconds=2)
    )
    assert await claim(pool, capacity=1) is None
    assert {e["job_id"] for e in await events_of(pool, "DeploymentWaitingForCapacity")} == {
        trial,
        enterprise,
    }
    # The operator raises MAX_INSTANCES to 2: the most urgent held job takes the one slot.
    first = await claim(pool, capacity=2)
    assert first is not None and first.job_id == enterprise
    assert await claim(pool, capacity=2) is None  # the starting one holds the second slot
    await complete(pool, first)
    assert await claim(pool, capacity=2) is None
    last = await claim(pool, capacity=3)
    assert last is not None and last.job_id == trial


async def test_an_update_of_a_customer_without_an_instance_waits_too(pool: asyncpg.Pool) -> None:
    await deployed(pool, "starter", T0, capacity=1)
    # Its deploy failed for good earlier, say: the update would start a new instance.
    update = await queue(pool, UPDATE, str(uuid.uuid4()), "starter", T0 + timedelta(seconds=1))
    assert await claim(pool, capacity=1) is None
    assert [e["job_id"] for e in await events_of(pool, "DeploymentWaitingForCapacity")] == [update]
    assert (await claim(pool, capacity=None)) is not None  # no limit: it runs


# --- recording a change on the log --------------------------------------------------------------


def state(running: int, limit: int | None) -> CapacityState:
    return CapacityState(
        capacity=Capacity(limit=limit, limited_by=None if limit is None else "setting"),
        running=running,
        waiting=0,
    )


async def apply(pool: asyncpg.Pool, appended: Any) -> None:
    from contracts import decode_event

    async with pool.acquire() as conn:
        await when_instance_capacity_changed_remember_it(
            conn,
            Recorded(
                seq=appended.seq,
                envelope=appended.envelope,
                event=decode_event(appended.envelope),
            ),
        )


async def test_a_change_is_recorded_once_and_only_from_the_logs_last_change(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    async with pool.acquire() as conn:
        # Room, as everyone assumes before anything is recorded: nothing to say.
        assert await record_capacity_change(conn, store, state(10, 100)) is None
        first = await record_capacity_change(conn, store, state(100, 100))
        assert first is not None and first.envelope.customer_id is None
        assert first.subject.endswith(".InstanceCapacityChanged.platform")
        # Not applied here yet: a second replica deciding from the lagging view loses.
        assert await record_capacity_change(conn, store, state(50, 100)) is None
    await apply(pool, first)
    async with pool.acquire() as conn:
        # Nothing new to say: still full (running moves without a record).
        assert await record_capacity_change(conn, store, state(101, 100)) is None
        # A capacity that moves (the memory bound drifts all the time) is not news either.
        assert await record_capacity_change(conn, store, state(103, 103)) is None
        assert await record_capacity_change(conn, store, state(150, 150)) is None
        room = await record_capacity_change(conn, store, state(50, 100))
        assert room is not None
        # The same decision by another replica from the same view: stored once.
        assert await record_capacity_change(conn, store, state(50, 100)) is None
    await apply(pool, room)
    async with pool.acquire() as conn:
        assert await record_capacity_change(conn, store, state(50, 200)) is None
        lowered = await record_capacity_change(conn, store, state(50, 40))
    assert lowered is not None
    changes = [
        decode_envelope(m.data) async for m in store.read(event_types=["InstanceCapacityChanged"])
    ]
    assert [json.loads(bytes(e.data))["full"] for e in changes] == [True, False, True]
    assert json.loads(bytes(changes[-1].data))["capacity"] == 40


async def test_a_job_behind_its_customers_starting_deploy_is_not_said_to_wait_for_capacity(
    pool: asyncpg.Pool,
) -> None:
    customer_id = str(uuid.uuid4())
    await queue(pool, DEPLOY, customer_id, "starter", T0)
    starting = await claim(pool, capacity=1)
    assert starting is not None
    # A new license while its instance starts: the update waits for the deploy, not for room.
    update = await queue(pool, UPDATE, customer_id, "professional", T0 + timedelta(seconds=1))
    assert await claim(pool, capacity=1) is None
    assert await events_of(pool, "DeploymentWaitingForCapacity") == []
    await complete(pool, starting)
    then = await claim(pool, capacity=1)
    assert then is not None and then.job_id == update
