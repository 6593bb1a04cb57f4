"""Settings of a customer instance, given by whoever runs it (the provisioner's backends)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from libs.config import LogLevel, Port, PostgresUrl


class InstanceSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Whose instance this is, its database, its license and where to check it."""

    instance_customer_id: Annotated[str, Meta(min_length=1)]
    database_url: PostgresUrl
    # The license JWT: a file (re-read on SIGHUP, as the backends update it) or the value.
    license_file: str | None = None
    license_jwt: str | None = None
    # The control plane's JWKS, fetched at start and when a license names an unknown key.
    license_jwks_url: str
    license_issuer: str = "iotistic-licensing"
    http_host: str = "127.0.0.1"
    http_port: Port = 8080
    log_level: LogLevel = "INFO"
