"""An operator's bad day during an import: Postgres cuts the instance's connections while an
archive is restored. The import answers 201 (it was done before the cut) or 503 with nothing
written, never a 500 or half an archive; a retry of the same archive then restores it whole.
Real control plane, instances, Postgres, NATS and Mosquitto (test_export's archive).
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from export_steps import manifest_of
from test_export import exported, olga  # noqa: F401 - fixtures
from test_instance import client, customer, instance_database  # noqa: F401 - client fixture

pytestmark = pytest.mark.slow

CUT = (
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
)


async def test_a_cut_mid_import_leaves_nothing_and_a_retry_restores_it(
    exported: bytes,  # noqa: F811
    client,  # noqa: F811
    postgres_server_url: str,
) -> None:
    tess = await customer(client, "tess@example.com")
    devices = sum(
        f.get("rows", 0) for f in manifest_of(exported)["files"] if f["name"] == "devices.jsonl"
    )
    try:
        async with instance_database(postgres_server_url, tess) as admin:
            first = asyncio.create_task(tess.api.post("/api/import", content=exported, timeout=120))
            cuts = 0
            while not first.done():
                cuts += await admin.fetchval(CUT)
                await asyncio.sleep(0.005)
            answer = await first
            assert answer.status_code in {201, 503}, answer.text
            if answer.status_code == 503:
                assert cuts > 0
                assert await admin.fetchval("SELECT count(*) FROM devices") == 0
                assert await admin.fetchval("SELECT count(*) FROM readings") == 0
                assert await admin.fetchval("SELECT count(*) FROM imports") == 0
        retried = await tess.api.post("/api/import", content=exported, timeout=120)
        assert retried.status_code in {200, 201}, retried.text
        async with instance_database(postgres_server_url, tess) as admin:
            assert await admin.fetchval("SELECT count(*) FROM devices") == devices
            assert await admin.fetchval("SELECT count(*) FROM imports") == 1
    finally:
        with contextlib.suppress(Exception):
            await tess.api.aclose()
