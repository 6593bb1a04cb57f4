"""What tests of integrations share: a real HTTP receiver that records every signed POST (and
can refuse some), and an instance database with stored readings."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from litestar import Litestar, Request, Response, post
from litestar.response import Stream

from libs.db.postgres import load_migrations, migrate
from services.instance.readings import store_readings
from services.instance.webhook_posts import sign
from support import create_database, serving


@dataclass
class Receiver:
    """Every POST received at ``/hook``, whether its signature held, and how many POSTs to
    refuse (500) before accepting again."""

    secret: str = ""
    posts: list[dict[str, Any]] = field(default_factory=list)
    refuse: int = 0
    refused: int = 0
    bad_signatures: int = 0
    url: str = ""
    # Answers 200 with a body that never ends.
    endless_url: str = ""
    # While set and not released, every POST waits (a receiver that does not answer).
    hold: asyncio.Event | None = None

    def readings(self, *, backfill: str | None = None) -> list[tuple[str, str]]:
        """The (device_id, ts) of every reading received, live (or of one backfill)."""
        return [
            (r["device_id"], r["ts"])
            for p in self.posts
            if p["type"] == "readings" and p.get("backfill_id") == backfill
            for r in p["readings"]
        ]

    def events(self) -> list[dict[str, Any]]:
        """Every event received."""
        return [e for p in self.posts if p["type"] == "events" for e in p["events"]]


@contextlib.asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    """A receiver served over HTTP on loopback, until the block ends."""
    receiver = Receiver()

    @post("/hook", status_code=200)
    async def hook(request: Request[Any, Any, Any]) -> Response[str]:
        body = (await request.body()).decode()
        if receiver.hold is not None:
            await receiver.hold.wait()
        stamp = request.headers.get("x-iotistic-timestamp", "")
        expected = sign(receiver.secret, stamp, body)
        if request.headers.get("x-iotistic-signature") != expected:
            receiver.bad_signatures += 1
        if receiver.refuse > 0:
            receiver.refuse -= 1
            receiver.refused += 1
            return Response("not now", status_code=500)
        receiver.posts.append(
            {**json.loads(body), "delivery": request.headers.get("x-iotistic-delivery")}
        )
        return Response("ok", status_code=200)

    @post("/endless", status_code=200)
    async def endless(request: Request[Any, Any, Any]) -> Stream:
        receiver.posts.append({**json.loads(await request.body()), "delivery": "endless"})

        async def chunks() -> AsyncIterator[bytes]:
            while True:
                yield b"x" * 65536
                await asyncio.sleep(0)

        return Stream(chunks())

    async with serving(Litestar([hook, endless])) as client:
        receiver.url = f"{str(client.base_url).rstrip('/')}/hook"
        receiver.endless_url = f"{str(client.base_url).rstrip('/')}/endless"
        yield receiver


def reading_rows(device_id: str, start: datetime, count: int) -> list[tuple[Any, ...]]:
    """Rows as ingest writes them: one a second from ``start``."""
    values = (20.5, 40.0, 1000.0, 1e5, 50.0, 3, 600.0, 0.5, None)
    return [(device_id, start + timedelta(seconds=i), *values) for i in range(count)]


async def instance_database(server_url: str) -> str:
    """A migrated instance database with devices d1 and d2; its URL."""
    url = await create_database(server_url)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn, "instance", load_migrations("services.instance.migrations", "service"))
        await conn.execute("SET search_path TO instance")
        await conn.execute(
            "INSERT INTO devices (device_id, name, mqtt_username, created_at, last_seen) "
            "VALUES ('d1', 'hall', 'u1', now(), now()), ('d2', 'attic', 'u2', now(), now())"
        )
    finally:
        await conn.close()
    return url


async def store(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> int:
    """Store readings as ingest does: one statement, in a transaction."""
    async with conn.transaction():
        return await store_readings(conn, rows, set())
