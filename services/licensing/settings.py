"""Settings of the licensing service, on top of the common ones."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from libs.config import ServiceSettings


class LicensingSettings(ServiceSettings, frozen=True, kw_only=True):
    """Where the license signing keys are, and the issuer named in every license."""

    # A folder of PEM keys (newest signs, all are published), and/or one key in the environment.
    license_keys_dir: str | None = None
    license_private_key: str | None = None
    license_issuer: str = "iotistic-licensing"
    # A paid subscription's license is renewed when it has this many days left (of 30).
    license_renew_before_days: Annotated[int, Meta(ge=1, le=20)] = 7
    # How often the renewal scheduler looks for licenses due.
    license_renewal_scan_seconds: Annotated[float, Meta(gt=0, le=86400)] = 600.0
