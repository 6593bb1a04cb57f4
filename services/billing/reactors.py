"""What billing does when events arrive: start trials, and read Stripe's events.

Each handler is a function of its own, called with the reactor's connection and the event (and,
for Stripe's events, the settings and counters it needs), so a test can call one on a database
of its own. The effects go to the outbox in the reactor's transaction and reach the log once:
this module is where ``TrialStarted`` and the subscription events ``stripe_events.py`` decides
(``SubscriptionActivated``, ``SubscriptionChanged``, ``SubscriptionCanceled``,
``PaymentFailed``, ``InvoiceRecorded``) are appended.
"""

from __future__ import annotations

import functools
from datetime import timedelta

from contracts import CustomerSignedUp, StripeCustomerLinked, StripeEventReceived, TrialStarted
from libs.db.postgres import Connection
from libs.eventlog.store import caused_event_id
from libs.projections.apply import Projection, Recorded
from libs.runtime.outbox import add_to_outbox, outbox_relay
from libs.runtime.service import ServiceRuntime
from services.billing.closing import closed_subscriptions_reactor
from services.billing.settings import BillingSettings
from services.billing.stripe_api import StripeGateway
from services.billing.stripe_events import StripeTranslator, remember_customer
from services.billing.webhooks import WebhookMetrics, webhook_metrics


async def when_customer_signed_up_start_trial(
    conn: Connection, r: Recorded[CustomerSignedUp]
) -> None:
    """Every new customer gets the trial their signup names: ``TrialStarted``, once."""
    e = r.event
    await add_to_outbox(
        conn,
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


async def when_stripe_event_stored_apply_it(
    conn: Connection,
    r: Recorded[StripeEventReceived],
    *,
    settings: BillingSettings,
    metrics: WebhookMetrics,
) -> None:
    """A stored Stripe event becomes the domain events it means (often none)."""
    events = await StripeTranslator(conn, settings).translate(r)
    metrics.webhooks.labels("processed", r.event.stripe_type).inc()
    for index, event in enumerate(events):
        customer_id = getattr(event, "customer_id", None)
        await add_to_outbox(
            conn,
            event,
            customer_id=customer_id,
            causation=r.envelope,
            event_id=caused_event_id(r.envelope, f"stripe-{index}"),
        )


async def when_stripe_customer_linked_remember_it(
    conn: Connection, r: Recorded[StripeCustomerLinked]
) -> None:
    """Stripe events that name only Stripe's customer (invoices, say) find ours through it."""
    await remember_customer(conn, r.event.stripe_customer_id, r.event.customer_id)


def billing_reactors(runtime: ServiceRuntime) -> list[Projection]:
    """Start a trial for every new customer; turn stored Stripe events into domain events;
    cancel a closed account's subscription at Stripe (``closing.py``)."""
    settings = runtime.settings_as(BillingSettings)
    apply_stripe_event = functools.partial(
        when_stripe_event_stored_apply_it,
        settings=settings,
        metrics=webhook_metrics(runtime.registry),
    )
    # Each commit wakes the relay, so the effects reach the log at once.
    relay = outbox_relay(runtime)
    return [
        Projection(
            name="start_trials",
            tables=(),
            handlers={CustomerSignedUp: when_customer_signed_up_start_trial},
            after_commit=relay.wake,
        ),
        Projection(
            name="apply_stripe_events",
            tables=(),
            handlers={
                StripeEventReceived: apply_stripe_event,
                StripeCustomerLinked: when_stripe_customer_linked_remember_it,
            },
            after_commit=relay.wake,
        ),
        closed_subscriptions_reactor(StripeGateway(settings)),
    ]
