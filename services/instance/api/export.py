"""The exit guarantee: ``GET /api/export`` streams everything the customer owns as one archive,
and ``POST /api/import`` restores such an archive into a new, empty instance."""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from litestar import Controller, Request, get, post
from litestar.params import FromPath, QueryParameter
from litestar.response import Stream

from libs.http.errors import (
    Conflict,
    DomainError,
    Forbidden,
    NotFound,
    TooManyRequests,
    UpstreamError,
    invalid,
)
from services.instance.api.access import INSTANCE, Instance, customer_session, read_write
from services.instance.archive import ArchiveRefused, check_archive
from services.instance.customer_events import EventsUnavailable, fetch_customer_events
from services.instance.devices import DEVICES_LOCK, BrokerUnavailable
from services.instance.export import ExportRequest, export_archive
from services.instance.restore import (
    Imported,
    InstanceNotEmpty,
    TooManyDevices,
    issue_credentials,
    restore,
)

# The largest archive an import takes (it is written to a temporary file as it arrives).
IMPORT_MAX_BYTES = 64 << 30
DeadLetters = Annotated[
    bool, QueryParameter(description="include the dead letters (rejected payloads)")
]


class NoRoom(DomainError):
    """507: the archive does not fit on the instance's disk while it is checked."""

    status_code = 507
    code = "insufficient_storage"


def imported_view(done: Imported) -> dict[str, Any]:
    """The answer to an import."""
    answer: dict[str, Any] = {
        "imported": True,
        "first_time": done.first,
        "imported_at": done.imported_at,
        "from_customer_id": done.from_customer_id,
        "counts": done.counts,
        "device_ids": done.device_ids,
    }
    if done.first:
        answer["devices"] = done.credentials
        answer["webhook_secrets"] = done.webhook_secrets
        answer["integration_secrets"] = done.integration_secrets
        answer["note"] = (
            "devices have new ids and new broker credentials (passwords are shown only once); "
            "alert rules with a webhook and integrations have new signing secrets (shown only "
            "once); integrations are sent what happens from now on (ask for a backfill for the "
            "past); provisioning keys are not restored: make new ones"
        )
    else:
        answer["note"] = (
            "this archive was imported before; the devices' credentials were in that answer "
            "(POST /api/devices/{device_id}/credentials gives a device new ones)"
        )
    return answer


async def _received(request: Request[Any, Any, Any], folder: str) -> tuple[str, str]:
    """The request's body written to a file in ``folder`` as it arrives; its path and sha256."""
    path = os.path.join(folder, "archive.tar")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "wb") as out:  # noqa: ASYNC230 - local disk, a chunk at a time
            async for chunk in request.stream():
                size += len(chunk)
                if size > IMPORT_MAX_BYTES:
                    raise invalid("body", f"the archive is larger than {IMPORT_MAX_BYTES} bytes")
                digest.update(chunk)
                out.write(chunk)
    except OSError as exc:
        raise NoRoom(
            f"the instance has no room for the archive ({exc.strerror}); nothing was imported"
        ) from None
    if size == 0:
        raise invalid("body", "is empty: send the archive (application/x-tar)")
    return path, digest.hexdigest()


async def _import(request: Request[Any, Any, Any], instance: Instance) -> dict[str, Any]:
    """Receive, check and restore the archive the request carries."""
    with tempfile.TemporaryDirectory(prefix="iotistic-import-") as folder:
        path, sha256 = await _received(request, folder)
        try:
            checked = await asyncio.to_thread(check_archive, path)
            async with instance.pool().acquire() as conn:
                done = await restore(
                    conn,
                    checked,
                    sha256,
                    instance.devices,
                    instance.licensed().features.maxDevices,
                )
        except ArchiveRefused as exc:
            raise invalid(exc.file, exc.reason) from None
        except InstanceNotEmpty as exc:
            raise Conflict(str(exc)) from None
        except TooManyDevices as exc:
            raise Forbidden(str(exc)) from None
        except BrokerUnavailable as exc:
            raise UpstreamError(str(exc)) from None
    for device_id in done.device_ids.values():
        instance.ingest.know_device(device_id)
    return imported_view(done)


def _turn_free(instance: Instance) -> asyncio.Lock:
    """The instance's turn for an export or import; 429 while another one has it."""
    if instance.archive_turn.locked():
        raise TooManyRequests("an export or import is running; try again once it is done", 30)
    return instance.archive_turn


class ExportController(Controller):
    """Exporting and importing everything the customer owns."""

    path = "/api"
    guards = (customer_session,)
    dependencies = INSTANCE

    @get("/export", tags=["export"])
    async def export(self, instance: Instance, dead_letters: DeadLetters = False) -> Stream:
        """One tar archive: manifest, devices and configurations, readings per device and day
        (CSV and Parquet), rollups, alert rules and history, the customer's events."""
        customer = instance.settings.instance_customer_id
        turn = _turn_free(instance)
        pool = instance.pool()
        await pool.fetchval("SELECT 1")  # the database answers before the answer starts
        try:
            events = await fetch_customer_events(instance.settings)
            note = None
        except EventsUnavailable as exc:
            events, note = None, str(exc)
        request = ExportRequest(customer, events, note, dead_letters)

        async def body() -> AsyncIterator[bytes]:
            # Taken here, so that it is given back however the stream ends (a request that
            # passed the check with another one waits its turn instead).
            async with turn:
                async for part in export_archive(pool, request):
                    yield part

        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        return Stream(
            body(),
            media_type="application/x-tar",
            headers={
                "Content-Disposition": f'attachment; filename="iotistic-{customer}-{stamp}.tar"'
            },
        )

    @post(
        "/import",
        status_code=201,
        tags=["export"],
        guards=[read_write],
        request_max_body_size=IMPORT_MAX_BYTES,
    )
    async def import_archive(
        self, request: Request[Any, Any, Any], instance: Instance
    ) -> dict[str, Any]:
        """Restore an export archive into this instance, which must be new (empty)."""
        turn = _turn_free(instance)
        async with turn:
            return await _import(request, instance)

    @post(
        "/devices/{device_id:str}/credentials",
        status_code=201,
        tags=["devices"],
        guards=[read_write],
    )
    async def new_credentials(self, device_id: FromPath[str], instance: Instance) -> dict[str, Any]:
        """New broker credentials for a device registered by hand (an imported one, or one
        whose password was lost): the old password stops working; the new one is shown once."""
        async with instance.pool().acquire() as conn, conn.transaction():
            await conn.execute(DEVICES_LOCK)
            row = await conn.fetchrow(
                "SELECT device_id, mqtt_username, name, uuid FROM devices "
                "WHERE device_id = $1 AND deleted_at IS NULL",
                device_id,
            )
            if row is None:
                raise NotFound(f"no device {device_id}")
            if row["uuid"] is not None:
                raise Conflict(
                    "this device registered itself with a provisioning key: it gets its "
                    "credentials at its key exchange"
                )
            try:
                issued = await issue_credentials(instance.devices, [row])
            except BrokerUnavailable as exc:
                raise UpstreamError(str(exc)) from None
        return {**issued[0], "note": "the password is shown only once; store it on the device"}
