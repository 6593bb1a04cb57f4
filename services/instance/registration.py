"""Devices that register themselves with a provisioning key, and their key exchange.

The original agent makes its own ``uuid`` and ``deviceApiKey``, registers with the customer's
provisioning key (``POST /api/v1/device/register``) and gets broker credentials of its own, then
proves its ``deviceApiKey`` (``POST /api/v1/device/{uuid}/key-exchange``). Until then the device
is *pending*: a repeat registration with the same ``deviceApiKey`` (the first answer was lost)
gets a new password, one with another key is refused. After it, the device is *provisioned* and
its uuid cannot be registered again.

A registration counts against the license's ``maxDevices`` under the same advisory lock as a
device registered by hand, and against the key's ``max_uses`` under the key's row lock. Its broker
client is made inside the database transaction: a broker that refuses rolls everything back, and
a client left behind by a crash after the broker and before the commit carries our text name, so
the next registration of the uuid adopts it. On the shared broker a client of the uuid with
another customer's text name means the uuid is that customer's (409). The fleet role's rights
on the device's topics are added before the credentials are answered, so ingest receives the
device's first message.

Every attempt, accepted or refused, is a row of the audit trail; refused ones count against the
caller's address (``registration_audit``). At most ``AT_ONCE`` attempts hold a database
connection at once; one that gets no turn within ``TURN_WAIT`` is answered 503.

Longer than 400 lines because registration, its broker claim and the key exchange share the
one transaction's rules (locks, adoption, the audit), which read best in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import uuid as uuids
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import aiomqtt
import asyncpg
import msgspec

from libs.http.errors import (
    Conflict,
    DomainError,
    Forbidden,
    InvalidRequest,
    Unauthorized,
    UpstreamError,
)
from libs.http.validation import FieldErrors, json_object
from libs.mqtt.dynsec import DynSec, DynSecError
from services.instance import fleet
from services.instance.device_api_keys import ApiKeys
from services.instance.devices import (
    DEVICES_LOCK,
    BrokerUnavailable,
    Devices,
    count_active_devices,
)
from services.instance.provisioning_keys import key_hash, key_state, looks_like_key
from services.instance.registration_audit import (
    Attempt,
    LicenseFull,
    audit,
    count_failure,
    counts_as_failure,
    refuse_if_limited,
)

T = TypeVar("T")

API_KEY_MIN, API_KEY_MAX = 16, 256
NAME_LIMIT, TYPE_LIMIT = 100, 64
NOT_EXCHANGED = "unknown device or wrong deviceApiKey"
# The shapes of the client ids the platform's own clients are bound to (devices registered by
# hand, instances, the admin): a fleet device bound to one of them could push that client off
# the shared broker (the newer connection with a client id wins).
RESERVED_CLIENT_IDS = re.compile(r"^(?:[0-9a-f]{16}|instance-.*|iotistic-.*)$")
ELSEWHERE = "this uuid is registered elsewhere"
# A fleet device that has not completed its key exchange this long after registering is
# removed by housekeeping.
ABANDONED_AFTER = timedelta(hours=24)
# Registrations and key exchanges holding a database connection at once. They take turns on
# the devices' lock anyway; a burst of them (a fleet powering up) must leave the pool's other
# connections to ingest, the API and readiness, which otherwise found none within its second
# and said the database was away.
AT_ONCE = 2
# How long one waits for its turn before it is answered 503 (retry): with the broker stalled,
# each turn takes the broker administration's timeout, and a herd of devices retrying must not
# pile up waiting requests without bound.
TURN_WAIT = 8.0


class Busy(DomainError):
    """503: too many registrations are waiting for their turn; the device retries."""

    status_code = 503
    code = "unavailable"


@dataclass(frozen=True)
class Registration:
    """What a device sends to register (the original agent's camelCase fields)."""

    uuid: str
    device_name: str
    device_type: str | None
    api_key: str = field(repr=False)


@dataclass(frozen=True)
class FleetRegistered:
    """A registered fleet device and its broker credentials (the password is shown once)."""

    device_id: str
    uuid: str
    device_name: str
    device_type: str | None
    password: str = field(repr=False)

    @property
    def username(self) -> str:
        """Its broker client."""
        return fleet.broker_username(self.uuid)


def _decoded(body: bytes) -> dict[str, Any]:
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise InvalidRequest(
            "invalid request", fields=[{"field": "body", "reason": "is not JSON"}]
        ) from None
    except RecursionError:
        # A refusal of the attempt (audited, counted against the address), not only the
        # app-wide 400 that would skip both: these routes read their body by hand.
        raise InvalidRequest(
            "invalid request", fields=[{"field": "body", "reason": "is nested too deeply"}]
        ) from None
    return json_object(data)


def api_key_reason(value: Any) -> str | None:
    """Why ``value`` is not a ``deviceApiKey`` (16..256 printable ASCII), or None."""
    if not isinstance(value, str):
        return "must be a string"
    if not API_KEY_MIN <= len(value) <= API_KEY_MAX:
        return f"must be {API_KEY_MIN} to {API_KEY_MAX} characters"
    if not all(" " <= c <= "~" for c in value):
        return "must be printable ASCII"
    return None


def registration_request(body: bytes) -> Registration:
    """The registration in ``body``, or a 400 naming every bad field. Fields the agent sends
    beyond these are ignored (other versions of it send more)."""
    data = _decoded(body)
    errors = FieldErrors()
    uuid = data.get("uuid")
    if not isinstance(uuid, str) or not fleet.valid_uuid(uuid):
        errors.add("uuid", "must be 8 to 64 letters, digits, '-' or '_', first a letter or digit")
    elif RESERVED_CLIENT_IDS.fullmatch(uuid):
        errors.add("uuid", "has the shape of the platform's own client ids; use a UUID")
    name = errors.text(data, "deviceName", required=False, limit=NAME_LIMIT)
    device_type = errors.text(data, "deviceType", required=False, limit=TYPE_LIMIT)
    api_key = data.get("deviceApiKey")
    if api_key is None:
        errors.add("deviceApiKey", "is required")
    elif reason := api_key_reason(api_key):
        errors.add("deviceApiKey", reason)
    errors.raise_if_any()
    return Registration(str(uuid), name or str(uuid), device_type or None, str(api_key))


def exchange_api_key(bearer: str | None, body: bytes) -> str:
    """The ``deviceApiKey`` of a key exchange: the bearer token, else the body's field."""
    if bearer:
        return bearer
    if not body.strip():
        raise Unauthorized(NOT_EXCHANGED)
    api_key = _decoded(body).get("deviceApiKey")
    if not isinstance(api_key, str) or not api_key:
        raise Unauthorized(NOT_EXCHANGED)
    return api_key


def refuse_key(row: asyncpg.Record, now: datetime, *, new_device: bool) -> None:
    """403 for a key that registers nothing (more): revoked, expired, or (for a new device)
    used up."""
    state = key_state(row, now)
    if state == "active" or (state == "used up" and not new_device):
        return
    raise Forbidden(f"the provisioning key is {state}")


class FleetRegistrations:
    """Registering fleet devices and their key exchange, with the audit trail."""

    def __init__(self, devices: Devices) -> None:
        """Broker administration goes through ``devices`` (its settings)."""
        self._devices = devices
        self._settings = devices.settings
        self.api_keys = ApiKeys()
        self._at_once = asyncio.Semaphore(AT_ONCE)

    async def attempt(
        self,
        pool: asyncpg.Pool,
        attempt: Attempt,
        work: Callable[[asyncpg.Connection], Awaitable[T]],
    ) -> T:
        """Run ``work`` unless the address is rate-limited, and record the attempt in the audit
        trail (a refused one also against the address). The rate-limited ones are not recorded:
        a flood of them would fill the customer's database; nor those answered ``Busy`` (no
        turn within ``TURN_WAIT``)."""
        try:
            async with asyncio.timeout(TURN_WAIT):
                await self._at_once.acquire()
        except TimeoutError:
            raise Busy(
                "too many devices are registering; try again shortly",
                headers={"Retry-After": "5"},
            ) from None
        try:
            return await self._attempt(pool, attempt, work)
        finally:
            self._at_once.release()

    async def _attempt(
        self,
        pool: asyncpg.Pool,
        attempt: Attempt,
        work: Callable[[asyncpg.Connection], Awaitable[T]],
    ) -> T:
        async with pool.acquire() as conn:
            await refuse_if_limited(conn, attempt.address)
            try:
                result = await work(conn)
            except DomainError as exc:
                await audit(conn, attempt, "refused", exc.message)
                if counts_as_failure(exc):
                    await count_failure(conn, attempt.address)
                raise
            await audit(conn, attempt, "accepted", None)
            return result

    async def register(
        self,
        conn: asyncpg.Connection,
        attempt: Attempt,
        key: str | None,
        body: bytes,
        max_devices: int,
    ) -> FleetRegistered:
        """Register the device in ``body`` with the provisioning ``key``."""
        key_id = await self._key_id(conn, key)
        attempt.key_id = key_id
        request = registration_request(body)
        attempt.uuid = request.uuid
        held = await conn.fetchval(
            "SELECT api_key_hash FROM devices WHERE uuid = $1 AND deleted_at IS NULL",
            request.uuid,
        )
        # The slow hashes before any lock is taken.
        same_key = held is not None and await self.api_keys.verify(held, request.api_key)
        new_hash = await self.api_keys.hash(request.api_key)
        password = secrets.token_urlsafe(24)
        async with self._broker_admin() as dynsec, conn.transaction():
            key_row = await conn.fetchrow(
                "SELECT * FROM provisioning_keys WHERE key_id = $1 FOR UPDATE", key_id
            )
            assert key_row is not None  # keys are revoked, never deleted
            now = datetime.now(UTC)
            refuse_key(key_row, now, new_device=False)
            await conn.execute(DEVICES_LOCK)
            row = await conn.fetchrow(
                "SELECT * FROM devices WHERE uuid = $1 AND deleted_at IS NULL", request.uuid
            )
            if row is not None:
                if row["key_exchanged_at"] is not None:
                    raise Conflict("this uuid is already provisioned")
                if not same_key or row["api_key_hash"] != held:
                    raise Conflict("this uuid is pending with another deviceApiKey")
                await self._credentials(dynsec, request, password)
                return FleetRegistered(
                    row["device_id"], request.uuid, row["name"], row["device_type"], password
                )
            refuse_key(key_row, now, new_device=True)
            device_id = await self._insert(conn, request, key_id, new_hash, max_devices, now)
            await self._credentials(dynsec, request, password)
        return FleetRegistered(
            device_id, request.uuid, request.device_name, request.device_type, password
        )

    async def _key_id(self, conn: asyncpg.Connection, key: str | None) -> str:
        if not key:
            raise Unauthorized(
                "a provisioning key is required (Authorization: Bearer <key>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        found = None
        if looks_like_key(key):
            found = await conn.fetchval(
                "SELECT key_id FROM provisioning_keys WHERE key_hash = $1", key_hash(key)
            )
        if found is None:
            raise Unauthorized("unknown provisioning key", headers={"WWW-Authenticate": "Bearer"})
        return str(found)

    async def _insert(
        self,
        conn: asyncpg.Connection,
        request: Registration,
        key_id: str,
        api_key_hash: str,
        max_devices: int,
        now: datetime,
    ) -> str:
        """The device's row and one more use of its key, within the license's maxDevices."""
        if await count_active_devices(conn) >= max_devices:
            raise LicenseFull(f"the license allows {max_devices} devices (maxDevices), all taken")
        device_id = uuids.uuid4().hex[:16]
        username = fleet.broker_username(request.uuid)
        # A deleted device of this uuid gives up the broker user name (unique in the table,
        # deleted rows included), which stays readable on its row.
        await conn.execute(
            "UPDATE devices SET mqtt_username = mqtt_username || ' (deleted ' || device_id || ')'"
            " WHERE mqtt_username = $1 AND deleted_at IS NOT NULL",
            username,
        )
        try:
            await conn.execute(
                "INSERT INTO devices (device_id, name, mqtt_username, created_at, uuid,"
                " device_type, api_key_hash, provisioning_key_id)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                device_id,
                request.device_name,
                username,
                now,
                request.uuid,
                request.device_type,
                api_key_hash,
                key_id,
            )
        except asyncpg.UniqueViolationError:
            # Not expected under the lock; a conflict all the same, never a 500.
            raise Conflict("this uuid is being registered; try again") from None
        await conn.execute("UPDATE provisioning_keys SET uses = uses + 1 WHERE key_id = $1", key_id)
        return device_id

    @contextlib.asynccontextmanager
    async def _broker_admin(self) -> AsyncIterator[DynSec]:
        """The broker's administration, connected before any lock is taken: a broker that is
        away or stalled fails each registration after the administration's timeout, not one
        registration after another behind the devices' lock (nor a device's deletion behind
        them). What the broker refuses is a 502."""
        try:
            async with self._devices.broker_admin() as dynsec:
                yield dynsec
        except (DynSecError, OSError, aiomqtt.MqttError) as exc:
            raise UpstreamError(f"the broker refused the device: {exc}") from None
        except BrokerUnavailable as exc:
            raise UpstreamError(str(exc)) from None

    async def _credentials(self, dynsec: DynSec, request: Registration, password: str) -> None:
        """The device's broker client with this password (adopting our own, refusing another
        customer's), its role, and the fleet role's rights on its topics."""
        await self._claim_client(dynsec, request, password)
        await dynsec.add_role_acls(self._fleet_role(), fleet.reader_acls(request.uuid))

    async def _claim_client(self, dynsec: DynSec, request: Registration, password: str) -> None:
        uuid = request.uuid
        username = fleet.broker_username(uuid)
        owner = fleet.owner_text(self._settings.instance_customer_id)
        held = await dynsec.get_client(username)
        if held is not None and held.get("textname") != owner:
            raise Conflict(ELSEWHERE)
        await dynsec.ensure_role(username, fleet.device_acls(uuid))
        try:
            await dynsec.command(
                "createClient",
                username=username,
                password=password,
                roles=[{"rolename": username, "priority": -1}],
                textname=owner,
                clientid=uuid,
            )
            return
        except DynSecError as exc:
            if "already exists" not in str(exc).lower():
                raise
        # Made meanwhile or left by a crash: ours only if it carries our text name (creating
        # is atomic on the broker, so two customers cannot both get here with one uuid).
        held = await dynsec.get_client(username)
        if held is None or held.get("textname") != owner:
            raise Conflict(ELSEWHERE)
        await dynsec.ensure_client(username, password, [username], textname=owner, clientid=uuid)

    def _fleet_role(self) -> str:
        ingest_user = self._settings.mqtt_username
        if not ingest_user:
            raise BrokerUnavailable("this instance has no broker account for its fleet")
        return fleet.fleet_role(ingest_user)

    async def exchange(
        self, conn: asyncpg.Connection, attempt: Attempt, api_key: str
    ) -> dict[str, Any]:
        """Complete the device's key exchange with its ``deviceApiKey`` (again: the same)."""
        uuid = attempt.uuid or ""
        row = None
        if fleet.valid_uuid(uuid):
            row = await conn.fetchrow(
                "SELECT device_id, api_key_hash, provisioning_key_id FROM devices "
                "WHERE uuid = $1 AND deleted_at IS NULL",
                uuid,
            )
        held = row["api_key_hash"] if row is not None else None
        if row is not None:
            attempt.key_id = row["provisioning_key_id"]
        ok = api_key_reason(api_key) is None and await self.api_keys.verify(held, api_key)
        if row is None or not ok:
            raise Unauthorized(NOT_EXCHANGED)
        exchanged = await conn.fetchval(
            "UPDATE devices SET key_exchanged_at = coalesce(key_exchanged_at, $2) "
            "WHERE device_id = $1 AND deleted_at IS NULL RETURNING key_exchanged_at",
            row["device_id"],
            datetime.now(UTC),
        )
        if exchanged is None:
            raise Unauthorized(NOT_EXCHANGED)  # removed meanwhile (housekeeping)
        return {
            "id": row["device_id"],
            "uuid": uuid,
            "status": "provisioned",
            "key_exchanged_at": exchanged,
        }


async def abandoned_registrations(conn: asyncpg.Connection, now: datetime) -> list[str]:
    """The fleet devices registered ``ABANDONED_AFTER`` or longer before ``now`` whose key
    exchange never came."""
    rows = await conn.fetch(
        "SELECT device_id FROM devices WHERE uuid IS NOT NULL AND key_exchanged_at IS NULL "
        "AND deleted_at IS NULL AND created_at <= $1",
        now - ABANDONED_AFTER,
    )
    return [r["device_id"] for r in rows]
