"""``/api/integrations``: the customer's integrations (made, listed, changed, deleted) and
their backfills (asked for, followed, cancelled)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from litestar import Controller, Response, delete, get, post, put
from litestar.params import FromPath, JSONBody

from libs.http.errors import Forbidden, NotFound
from services.instance.api.access import INSTANCE, Instance, customer_session, read_write
from services.instance.integrations import backfills
from services.instance.integrations.store import (
    WebhooksNotLicensed,
    create_integration,
    delete_integration,
    integration_of,
    list_integrations,
    parse_change,
    parse_integration,
    shown,
    stored_integration,
    update_integration,
)

BODY_LIMIT = 4096


def _webhooks(instance: Instance) -> bool:
    return instance.licensed().features.webhooks


class IntegrationsController(Controller):
    """The customer's integrations and their backfills."""

    path = "/api/integrations"
    tags = ("integrations",)
    guards = (customer_session,)
    dependencies = INSTANCE

    @post("/", status_code=201, request_max_body_size=BODY_LIMIT, guards=[read_write])
    async def create_integration(self, data: JSONBody[Any], instance: Instance) -> dict[str, Any]:
        """An integration ``{name, url, kinds}``; its signing secret is in this answer only."""
        try:
            new = await parse_integration(data, _webhooks(instance), instance.webhook_targets)
        except WebhooksNotLicensed as exc:
            raise Forbidden(str(exc)) from None
        async with instance.pool().acquire() as conn:
            return await create_integration(conn, new, datetime.now(UTC))

    @get("/")
    async def list_integrations(self, instance: Instance) -> dict[str, Any]:
        """The integrations (without their secrets), each with how its delivery goes."""
        async with instance.pool().acquire() as conn:
            return {"integrations": await list_integrations(conn)}

    @get("/{integration_id:str}")
    async def integration(
        self, integration_id: FromPath[str], instance: Instance
    ) -> dict[str, Any]:
        """One integration and how its delivery goes."""
        async with instance.pool().acquire() as conn:
            row = await integration_of(conn, integration_id)
        if row is None:
            raise NotFound(f"no integration {integration_id[:64]}")
        return shown(row)

    @put("/{integration_id:str}", request_max_body_size=BODY_LIMIT, guards=[read_write])
    async def change_integration(
        self, integration_id: FromPath[str], data: JSONBody[Any], instance: Instance
    ) -> dict[str, Any]:
        """Change any of ``name``, ``url``, ``kinds``; a new URL (or ``rotate_secret: true``)
        gets a new secret, in this answer only."""
        async with instance.pool().acquire() as conn:
            stored = await stored_integration(conn, integration_id)
        if stored is None:
            raise NotFound(f"no integration {integration_id[:64]}")
        try:
            new, new_secret = await parse_change(
                data, stored, _webhooks(instance), instance.webhook_targets
            )
        except WebhooksNotLicensed as exc:
            raise Forbidden(str(exc)) from None
        async with instance.pool().acquire() as conn:
            changed = await update_integration(conn, integration_id, new, new_secret)
        if changed is None:  # deleted while its URL was checked
            raise NotFound(f"no integration {integration_id[:64]}")
        return changed

    @delete("/{integration_id:str}", status_code=204, guards=[read_write])
    async def delete_integration(self, integration_id: FromPath[str], instance: Instance) -> None:
        """Stop sending to it; its backfills are cancelled."""
        async with instance.pool().acquire() as conn:
            if not await delete_integration(conn, integration_id, datetime.now(UTC)):
                raise NotFound(f"no integration {integration_id[:64]}")

    @post(
        "/{integration_id:str}/backfills",
        request_max_body_size=BODY_LIMIT,
        guards=[read_write],
    )
    async def start_backfill(
        self, integration_id: FromPath[str], data: JSONBody[Any], instance: Instance
    ) -> Response[dict[str, Any]]:
        """Replay the readings stored from ``from`` to ``to`` (``rate`` a second at most):
        201 with the new backfill, or 200 with the same one already queued or running."""
        if not _webhooks(instance):
            raise Forbidden("the license does not include webhooks (integrations)")
        now = datetime.now(UTC)
        span = backfills.parse_backfill(data, now)
        async with instance.pool().acquire() as conn:
            if await integration_of(conn, integration_id) is None:
                raise NotFound(f"no integration {integration_id[:64]}")
            answer, new = await backfills.start_backfill(conn, integration_id, span, now)
        return Response(answer, status_code=201 if new else 200)

    @get("/{integration_id:str}/backfills")
    async def list_backfills(
        self, integration_id: FromPath[str], instance: Instance
    ) -> dict[str, Any]:
        """The integration's backfills, newest first."""
        now = datetime.now(UTC)
        async with instance.pool().acquire() as conn:
            if await integration_of(conn, integration_id) is None:
                raise NotFound(f"no integration {integration_id[:64]}")
            rows = await backfills.backfills_of(conn, integration_id)
        return {"backfills": [backfills.progress(r, now) for r in rows]}

    @get("/{integration_id:str}/backfills/{backfill_id:str}")
    async def backfill(
        self, integration_id: FromPath[str], backfill_id: FromPath[str], instance: Instance
    ) -> dict[str, Any]:
        """A backfill's progress: state, done/total and rate."""
        async with instance.pool().acquire() as conn:
            row = await backfills.backfill_of(conn, integration_id, backfill_id)
        if row is None:
            raise NotFound(f"no backfill {backfill_id[:64]}")
        return backfills.progress(row, datetime.now(UTC))

    @delete(
        "/{integration_id:str}/backfills/{backfill_id:str}", status_code=200, guards=[read_write]
    )
    async def cancel_backfill(
        self, integration_id: FromPath[str], backfill_id: FromPath[str], instance: Instance
    ) -> dict[str, Any]:
        """Cancel a queued or running backfill (one that finished stays as it was)."""
        now = datetime.now(UTC)
        async with instance.pool().acquire() as conn:
            row = await backfills.cancel_backfill(conn, integration_id, backfill_id, now)
        if row is None:
            raise NotFound(f"no backfill {backfill_id[:64]}")
        return backfills.progress(row, now)
