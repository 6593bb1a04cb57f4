"""The instance's license: verified with the control plane's public keys, re-read when it
changes (SIGHUP from the local backend, a periodic check for a Kubernetes Secret), and what it
allows now: active, in grace, or expired (read-only)."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry, Gauge

from contracts.license import LicenseClaims
from contracts.license_verify import InvalidLicense, LicenseVerifier, Status
from libs.observability.telemetry import traced_hooks
from services.instance.settings import InstanceSettings

log = logging.getLogger(__name__)

RELOAD_SECONDS = 60.0


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
        self._limits = Gauge(
            "iotistic_instance_license_limit",
            "What the held license allows: devices, MQTT messages and API requests per day, "
            "retention days",
            ["limit"],
            registry=registry,
        )

    def _token(self) -> str:
        if self._settings.license_file:
            return Path(self._settings.license_file).read_text().strip()
        return (self._settings.license_jwt or "").strip()

    async def _fetch_keys(self) -> LicenseVerifier:
        # The control plane's: the call carries the trace (the first start's, at start).
        async with httpx.AsyncClient(timeout=5, event_hooks=traced_hooks()) as client:
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
                self._show_limits(claims)
        self._valid.set(1 if self.claims is not None else 0)
        if self.error:
            log.warning("%s", self.error)

    def _show_limits(self, claims: LicenseClaims) -> None:
        allowed = {
            "devices": claims.features.maxDevices,
            "mqtt_messages_per_day": claims.limits.mqttMessagesPerDay,
            "api_requests_per_day": claims.limits.apiRequestsPerDay,
            "retention_days": claims.features.dataRetentionDays,
        }
        for limit, value in allowed.items():
            self._limits.labels(limit).set(value)

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

    def read_only(self, now: datetime) -> bool:
        """No license yet, or past its grace: queries only, no ingest and no changes."""
        return self.status(now) in (None, "expired")

    def allows_alerting(self, now: datetime) -> bool:
        """Whether rules are evaluated now: alerting is in the license, which has not expired."""
        claims = self.claims
        return bool(claims and claims.features.alerting) and not self.read_only(now)


async def until_licensed(holder: LicenseHolder) -> None:
    """Load the license until the first good one is in hand, retrying quickly."""
    delay = 0.2
    await holder.load()
    while holder.claims is None:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)
        await holder.load()


async def keep_license_current(holder: LicenseHolder) -> None:
    """Once the first license is in hand (``until_licensed``), re-read it every minute."""
    while True:
        await asyncio.sleep(RELOAD_SECONDS)
        await holder.load()
