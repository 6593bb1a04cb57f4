"""``/api/dead-letters``: what ingest could not take, and why."""

from __future__ import annotations

from typing import Any

from litestar import Controller, get

from services.instance.api.access import INSTANCE, Instance, customer_session
from services.instance.dead_letters import latest_dead_letters


class DeadLettersController(Controller):
    """The messages ingest refused."""

    path = "/api/dead-letters"
    guards = (customer_session,)
    dependencies = INSTANCE

    @get("/", tags=["readings"])
    async def dead_letters(self, instance: Instance) -> dict[str, Any]:
        """The latest rejected messages and why (payloads cut at 4 KiB)."""
        async with instance.pool().acquire() as conn:
            return {"dead_letters": await latest_dead_letters(conn)}
