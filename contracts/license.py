"""The license format: the claims of the RS256 JWT licensing signs and the instance verifies."""

from __future__ import annotations

import msgspec

from contracts.events import Features, Limits, Plan


class LicenseClaims(msgspec.Struct, frozen=True, kw_only=True):
    """What a license says. Unknown claims are accepted, so newer licenses never break old readers.

    ``issuedAt``/``expiresAt``/``graceUntil`` are RFC 3339 UTC; ``iat``/``exp`` epoch seconds.
    After ``exp`` the instance keeps working until ``graceUntil`` (if any), then goes read-only.
    """

    customerId: str
    plan: Plan
    issuedAt: str
    expiresAt: str
    features: Features
    limits: Limits
    iss: str
    sub: str
    iat: int
    exp: int
    licenseId: str
    licenseType: str
    graceUntil: str | None = None
