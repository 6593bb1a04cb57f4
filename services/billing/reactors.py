"""What billing does when other services' events arrive."""

from __future__ import annotations

from datetime import timedelta

from contracts import CustomerSignedUp, TrialStarted
from libs.db import Connection
from libs.eventstore import caused_event_id
from libs.projections import Projection, Recorded
from libs.runtime import ServiceRuntime


def billing_reactors(runtime: ServiceRuntime) -> list[Projection]:
    """Start a trial for every new customer."""

    async def when_customer_signed_up_start_trial(
        conn: Connection, r: Recorded[CustomerSignedUp]
    ) -> None:
        e = r.event
        await runtime.events().publish(
            TrialStarted(
                customer_id=e.customer_id,
                plan=e.plan,
                trial_started_at=e.signed_up_at,
                trial_ends_at=e.signed_up_at + timedelta(days=e.trial_days),
                trial_days=e.trial_days,
            ),
            customer_id=e.customer_id,
            causation=r.envelope,
            event_id=caused_event_id(r.envelope, "trial"),
        )

    return [
        Projection(
            name="start_trials",
            tables=(),
            handlers={CustomerSignedUp: when_customer_signed_up_start_trial},
        )
    ]
