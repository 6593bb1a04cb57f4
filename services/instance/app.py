"""The customer instance (target ``instance``): for now its health and its license.

The instance verifies its license with the control plane's public keys only (the JWKS) and
re-reads it on SIGHUP, which is how the local backend hands it a renewed or changed license.
Devices, readings, alerts and the dashboard come with the instance issue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from litestar import Litestar, get
from prometheus_client import CollectorRegistry, Gauge

from contracts.license import LicenseClaims
from libs.db import CONNECTION_ERRORS
from libs.http import create_app
from libs.license_verify import InvalidLicense, LicenseVerifier, Status
from services.instance.settings import InstanceSettings

log = logging.getLogger(__name__)


class LicenseHolder:
    """The instance's current license: read, verified, and kept while a newer one is bad."""

    def __init__(self, settings: InstanceSettings, registry: CollectorRegistry) -> None:
        self._settings = settings
        self._verifier: LicenseVerifier | None = None
        self.claims: LicenseClaims | None = None
        self.error: str | None = None
        self._valid = Gauge(
            "iotistic_instance_license_valid",
            "1 while the instance holds an authentic license (active, grace or expired)",
            registry=registry,
        )
        self._expires = Gauge(
            "iotistic_instance_license_expires_timestamp_seconds",
            "When the instance's license expires (exp)",
            registry=registry,
        )

    def _token(self) -> str:
        if self._settings.license_file:
            return Path(self._settings.license_file).read_text().strip()
        return (self._settings.license_jwt or "").strip()

    async def _fetch_keys(self) -> LicenseVerifier:
        async with httpx.AsyncClient(timeout=5) as client:
            answer = await client.get(self._settings.license_jwks_url)
            answer.raise_for_status()
        return LicenseVerifier.from_jwks(answer.json(), issuer=self._settings.license_issuer)

    async def load(self) -> None:
        """Read and verify the license; on failure keep the last good one and say why."""
        try:
            token = self._token()
            if self._verifier is None:
                self._verifier = await self._fetch_keys()
            try:
                claims = self._verifier.authentic(token)
            except InvalidLicense as exc:
                if exc.reason != "unknown_kid":
                    raise
                self._verifier = await self._fetch_keys()  # keys rotated since we fetched
                claims = self._verifier.authentic(token)
        except InvalidLicense as exc:
            self.error = f"license rejected ({exc.reason}): {exc}"
        except (OSError, httpx.HTTPError, ValueError) as exc:
            self.error = f"license not loaded: {type(exc).__name__}: {exc}"
        else:
            if claims.customerId != self._settings.instance_customer_id:
                self.error = "license rejected: it names another customer"
            else:
                self.claims, self.error = claims, None
                self._expires.set(claims.exp)
        self._valid.set(1 if self.claims is not None else 0)
        if self.error:
            log.warning("%s", self.error)

    def status(self, now: datetime) -> Status | None:
        """Where the held license stands now."""
        if self.claims is None or self._verifier is None:
            return None
        moment = now.timestamp()
        if moment <= self.claims.exp:
            return "active"
        grace = self.claims.graceUntil
        if grace is not None and moment <= datetime.fromisoformat(grace).timestamp():
            return "grace"
        return "expired"


def create_instance_app(settings: InstanceSettings) -> Litestar:
    """The instance's HTTP app: health, readiness (database and license) and its license."""
    registry = CollectorRegistry()
    holder = LicenseHolder(settings, registry)
    state: dict[str, asyncpg.Pool] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(holder.load()))
        keeper = loop.create_task(_keep_loading(holder))
        try:
            state["pool"] = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            log.warning("database not reachable at start: %s", type(exc).__name__)
        try:
            yield
        finally:
            keeper.cancel()
            loop.remove_signal_handler(signal.SIGHUP)
            if "pool" in state:
                await state["pool"].close()

    async def readiness() -> tuple[bool, dict[str, Any]]:
        database = await _database_ok(state.get("pool"))
        status = holder.status(datetime.now(UTC))
        detail = {
            "customer_id": settings.instance_customer_id,
            "database": {"ok": database},
            "license": {"status": status, "error": holder.error},
        }
        return database and status is not None, detail

    @get("/api/license", tags=["instance"])
    async def license_view() -> dict[str, Any]:
        """The license this instance runs under and what it allows."""
        claims = holder.claims
        if claims is None:
            return {"status": None, "error": holder.error}
        status = holder.status(datetime.now(UTC))
        return {
            "customer_id": claims.customerId,
            "license_id": claims.licenseId,
            "license_type": claims.licenseType,
            "plan": claims.plan,
            "expires_at": claims.expiresAt,
            "grace_until": claims.graceUntil,
            "status": status,
            "mode": "read-only" if status == "expired" else "read-write",
            "features": claims.features,
            "limits": claims.limits,
            "error": holder.error,
        }

    return create_app(
        title=f"Iotistic instance {settings.instance_customer_id}",
        route_handlers=[license_view],
        readiness=readiness,
        registry=registry,
        lifespan=[lifespan],
    )


async def _keep_loading(holder: LicenseHolder) -> None:
    # Until the first license is in hand (the control plane may still be starting), retry.
    delay = 0.2
    while holder.claims is None:
        await holder.load()
        if holder.claims is not None:
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


async def _database_ok(pool: asyncpg.Pool | None) -> bool:
    if pool is None:
        return False
    try:
        async with pool.acquire(timeout=1) as conn:
            await conn.fetchval("SELECT 1")
    except (*CONNECTION_ERRORS, asyncpg.PostgresError, TimeoutError):
        return False
    return True
