"""Wiring of the licensing service: plans, signed licenses, keys and license history."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

from litestar.types import ControllerRouterHandler

from contracts import LicenseIssued, LicenseRevoked
from libs.projections.apply import Projection
from libs.runtime.outbox import outbox_worker
from libs.runtime.scheduling import every
from libs.runtime.service import ServiceDefinition, ServiceRuntime
from libs.runtime.supervision import Worker
from services.licensing.access import ACCOUNT_ACCESS
from services.licensing.issuing import LicenseSigner
from services.licensing.keys import KeyRing, load_keyring
from services.licensing.projections import LICENSES
from services.licensing.reactors import licensing_reactors
from services.licensing.renewals import renew_due_licenses
from services.licensing.routes import licensing_routes
from services.licensing.settings import LicensingSettings


@cache
def _keyring(settings: LicensingSettings) -> KeyRing:
    # Loaded once per process: key objects, never PEM strings, are handed to the JWT library.
    folder = Path(settings.license_keys_dir) if settings.license_keys_dir else None
    return load_keyring(folder, settings.license_private_key)


def _reactors(runtime: ServiceRuntime) -> Sequence[Projection]:
    return licensing_reactors(runtime, _signer(runtime))


def _signer(runtime: ServiceRuntime) -> LicenseSigner:
    settings = runtime.settings_as(LicensingSettings)
    return LicenseSigner(_keyring(settings), issuer=settings.license_issuer)


def _workers(runtime: ServiceRuntime) -> list[Worker]:
    settings = runtime.settings_as(LicensingSettings)
    before = timedelta(days=settings.license_renew_before_days)
    signer = _signer(runtime)

    async def renew() -> int:
        return await renew_due_licenses(
            runtime.db(), runtime.events(), signer, datetime.now(UTC), before
        )

    return [
        every(settings.license_renewal_scan_seconds, "renewal scheduler: licenses renewed", renew),
        outbox_worker(runtime),
    ]


def _routes(runtime: ServiceRuntime) -> Sequence[ControllerRouterHandler]:
    return licensing_routes(runtime, _keyring(runtime.settings_as(LicensingSettings)))


LICENSING = ServiceDefinition(
    name="licensing",
    migrations_package="services.licensing.migrations",
    projections=(LICENSES, ACCOUNT_ACCESS),
    reactors=_reactors,
    routes=_routes,
    workers=_workers,
    emits=(
        LicenseIssued,
        LicenseRevoked,
    ),
    reactor_names=("issue_licenses",),
    settings_type=LicensingSettings,
)
