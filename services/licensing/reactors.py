"""What licensing does when other services' events arrive: issue licenses."""

from __future__ import annotations

from datetime import timedelta

from contracts import CustomerSignedUp, LicenseIssued
from libs.db import Connection
from libs.eventstore import caused_event_id
from libs.projections import Projection, Recorded
from libs.runtime import ServiceRuntime
from services.licensing.keys import LicenseSigner, build_claims
from services.licensing.plans import plan


def licensing_reactors(runtime: ServiceRuntime, signer: LicenseSigner) -> list[Projection]:
    """Issue a trial license to every new customer."""

    async def when_customer_signed_up_issue_trial_license(
        conn: Connection, r: Recorded[CustomerSignedUp]
    ) -> None:
        e = r.event
        license_id = caused_event_id(r.envelope, "license")
        if await conn.fetchval("SELECT 1 FROM licenses WHERE license_id = $1", license_id):
            return  # issued and projected already: this is a redelivery
        spec = plan(e.plan)
        # Times come from the signup itself, so issuing again yields the very same token.
        issued_at = e.signed_up_at
        expires_at = e.signed_up_at + timedelta(days=e.trial_days)
        claims = build_claims(
            customer_id=e.customer_id,
            license_id=license_id,
            plan=spec,
            license_type="trial_signup",
            issued_at=issued_at,
            expires_at=expires_at,
            grace_until=None,
            issuer=signer.issuer,
        )
        await runtime.events().publish(
            LicenseIssued(
                customer_id=e.customer_id,
                license_id=license_id,
                jwt=signer.sign(claims),
                kid=signer.kid,
                plan=spec.name,
                issued_at=issued_at,
                expires_at=expires_at,
                features=spec.features,
                limits=spec.limits,
                license_type="trial_signup",
                reason=f"{e.trial_days}-day trial at signup",
                issued_by="system",
            ),
            customer_id=e.customer_id,
            causation=r.envelope,
            event_id=caused_event_id(r.envelope, "license-issued"),
        )

    return [
        Projection(
            name="issue_licenses",
            tables=(),
            handlers={CustomerSignedUp: when_customer_signed_up_issue_trial_license},
        )
    ]
