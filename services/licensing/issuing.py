"""Issuing a license: its claims for a plan and a period, signed RS256 with the key ring's
current key, in the LicenseIssued event that records it; and how long licenses last.

Everything here is derived from its arguments (no clock, no I/O), so the reactors and the
renewal scheduler that issue the same license again sign the very same token.
"""

from __future__ import annotations

from datetime import UTC, datetime

import jwt
import msgspec

from contracts import LicenseIssued
from contracts.license import LicenseClaims
from services.licensing.keys import KeyConfigError, KeyRing
from services.licensing.plans import PlanSpec, plan

SUBSCRIPTION_LICENSE_DAYS = 30
GRACE_DAYS = 7


def signed_license(
    signer: LicenseSigner,
    *,
    customer_id: str,
    license_id: str,
    plan_name: str,
    license_type: str,
    issued_at: datetime,
    expires_at: datetime,
    grace_until: datetime | None,
    reason: str,
) -> LicenseIssued:
    """The LicenseIssued event for a license signed now with the newest key."""
    spec = plan(plan_name)
    claims = build_claims(
        customer_id=customer_id,
        license_id=license_id,
        plan=spec,
        license_type=license_type,
        issued_at=issued_at,
        expires_at=expires_at,
        grace_until=grace_until,
        issuer=signer.issuer,
    )
    return LicenseIssued(
        customer_id=customer_id,
        license_id=license_id,
        jwt=signer.sign(claims),
        kid=signer.kid,
        plan=spec.name,
        issued_at=issued_at,
        expires_at=expires_at,
        features=spec.features,
        limits=spec.limits,
        license_type=license_type,
        reason=reason,
        issued_by="system",
        grace_until=grace_until,
    )


def build_claims(
    *,
    customer_id: str,
    license_id: str,
    plan: PlanSpec,
    license_type: str,
    issued_at: datetime,
    expires_at: datetime,
    grace_until: datetime | None,
    issuer: str,
) -> LicenseClaims:
    """The claims of a license for ``plan`` over the given period."""

    def rfc3339(moment: datetime) -> str:
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    return LicenseClaims(
        customerId=customer_id,
        plan=plan.name,
        issuedAt=rfc3339(issued_at),
        expiresAt=rfc3339(expires_at),
        features=plan.features,
        limits=plan.limits,
        iss=issuer,
        sub=customer_id,
        iat=int(issued_at.timestamp()),
        exp=int(expires_at.timestamp()),
        licenseId=license_id,
        licenseType=license_type,
        graceUntil=rfc3339(grace_until) if grace_until else None,
    )


class LicenseSigner:
    """Signs license claims with the key ring's current key."""

    def __init__(self, keyring: KeyRing, issuer: str = "iotistic-licensing") -> None:
        """Sign with ``keyring.current``; ``issuer`` goes into every license's ``iss``."""
        self.keyring = keyring
        self.issuer = issuer

    @property
    def kid(self) -> str:
        """The id of the key that signs."""
        return self.keyring.current.kid

    def sign(self, claims: LicenseClaims) -> str:
        """The license JWT (RS256, ``kid`` in the header)."""
        key = self.keyring.current
        if key.private_key is None:  # KeyRing.current never returns one, but say so plainly
            raise KeyConfigError("the current license key has no private half")
        return jwt.encode(
            msgspec.to_builtins(claims),
            key.private_key,
            algorithm="RS256",
            headers={"kid": key.kid, "typ": "JWT"},
        )
