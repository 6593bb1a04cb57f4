"""libs.db.postgres against a real Postgres: the pool gives back what a burst opened, and
periodic work takes its connections in turns."""

from __future__ import annotations

import asyncio

import asyncpg

from libs.db.postgres import Turns, create_pool
from support import eventually

APPLICATION = "iotistic-public"  # create_pool's application_name for the schema public


async def _backends(conn: asyncpg.Connection) -> int:
    """Connections of the pools under test (on this test module's own database)."""
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 "
            "AND datname = current_database()",
            APPLICATION,
        )
    )


async def test_holders_take_turns_on_one_connection(database_url: str) -> None:
    pool = await create_pool(database_url, "public", max_size=4, idle_seconds=0.5)
    watcher = await asyncpg.connect(database_url)
    turns = Turns(lambda: pool)
    order: list[str] = []

    async def hold(name: str, release: asyncio.Event) -> int:
        async with turns.acquire() as conn:
            order.append(name)
            await release.wait()
            return int(await conn.fetchval("SELECT pg_backend_pid()"))

    try:
        first_done, second_done = asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(hold("first", first_done))
        second = asyncio.create_task(hold("second", second_done))
        second_done.set()  # ready to finish at once, but it must wait for its turn
        await eventually(lambda: asyncio.sleep(0, order), lambda o: o == ["first"])
        assert not second.done()
        first_done.set()
        assert await first == await second  # the same connection, one after the other
        assert order == ["first", "second"]
        assert await _backends(watcher) == 1
    finally:
        await pool.close()
        await watcher.close()


async def test_a_holder_tired_of_waiting_goes_beside_and_the_extra_connection_closes(
    database_url: str,
) -> None:
    pool = await create_pool(database_url, "public", max_size=4, idle_seconds=0.5)
    watcher = await asyncpg.connect(database_url)
    turns = Turns(lambda: pool)
    try:
        async with turns.acquire() as held, turns.acquire(wait_turn=0.1) as beside:
            assert beside is not held
            assert await _backends(watcher) == 2
        # Above the floor of one, a connection unused for idle_seconds is closed.
        await eventually(lambda: _backends(watcher), lambda n: n == 1, what="one connection")
    finally:
        await pool.close()
        await watcher.close()
