"""Settings of the licensing service, on top of the common ones."""

from __future__ import annotations

from libs.config import ServiceSettings


class LicensingSettings(ServiceSettings, frozen=True, kw_only=True):
    """Where the license signing keys are, and the issuer named in every license."""

    # A folder of PEM keys (newest signs, all are published), and/or one key in the environment.
    license_keys_dir: str | None = None
    license_private_key: str | None = None
    license_issuer: str = "iotistic-licensing"
