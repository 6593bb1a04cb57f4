"""Settings of the billing service, on top of the common ones."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta
from nats.aio.client import DEFAULT_MAX_PAYLOAD_SIZE

from libs.config import ServiceSettings

HttpUrl = Annotated[str, Meta(pattern=r"^https?://[^\s]+$")]
# Room for the envelope and NATS headers of the largest StripeEventReceived the gateway can
# append: its facts are bounded by their contract, and the trace context a caller may pass on
# by OpenTelemetry's (8192 characters of tracestate, in the body and in a header).
# tests/security/test_stripe_webhooks.py builds that worst case and holds it to this.
STRIPE_EVENT_RESERVE = 64 * 1024
# However it is configured, the gateway takes no body that one message of a NATS server left at
# its default max_payload (1 MiB) could not carry along with that envelope.
WEBHOOK_BODY_CEILING = DEFAULT_MAX_PAYLOAD_SIZE - STRIPE_EVENT_RESERVE


class BillingSettings(ServiceSettings, frozen=True, kw_only=True):
    """Stripe's webhook secret, how old and big a signed webhook may be, how long it is kept."""

    # whsec_... from Stripe's dashboard; unset refuses every webhook (503) rather than trust one.
    stripe_webhook_secret: Annotated[str, Meta(min_length=8)] | None = None
    # Stripe's own default: a signature older than this is refused as a possible replay.
    stripe_webhook_tolerance_seconds: Annotated[int, Meta(ge=1, le=3600)] = 300
    # The largest webhook body taken; a bigger one gets 413 and is stored nowhere. Stripe's
    # events are typically a few KB.
    stripe_webhook_max_bytes: Annotated[int, Meta(ge=4096, le=WEBHOOK_BODY_CEILING)] = 512 * 1024
    # How long billing keeps a webhook's raw body (personal data included) before deleting it;
    # the log keeps only the facts billing needs. Fractions of a day are allowed.
    stripe_payload_retention_days: Annotated[float, Meta(ge=0, le=3650)] = 30.0
    # How often the purge looks for bodies past their retention.
    stripe_payload_purge_seconds: Annotated[float, Meta(gt=0, le=86400)] = 3600.0
    # Instances report usage with a token derived from this (the provisioner hands it out).
    usage_secret: Annotated[str, Meta(min_length=32)] | None = None
    # How often the trial scheduler looks for trials that ended unpaid.
    trial_scan_seconds: Annotated[float, Meta(gt=0, le=3600)] = 60.0
    # Stripe price ids of the plans (price_...): a subscription's plan is read from its price.
    stripe_price_starter: str | None = None
    stripe_price_professional: str | None = None
    stripe_price_enterprise: str | None = None
    # sk_... (or a restricted rk_... key with customers, checkout and portal write access).
    # Unset: checkout and portal answer 503; webhooks and trials work without it.
    stripe_secret_key: Annotated[str, Meta(min_length=8)] | None = None
    # Where Stripe's HTTP API answers. Only tests and air-gapped set-ups change it, to point the
    # stripe package at a stand-in server.
    stripe_api_base: HttpUrl = "https://api.stripe.com"
    stripe_timeout_seconds: Annotated[float, Meta(gt=0, le=120)] = 20.0
    # Where Stripe sends the customer back after checkout or the billing portal: the account
    # page, which says how the checkout went (`iotistic up` sets its own).
    billing_return_url: HttpUrl = "http://127.0.0.1:8080/account"

    def plan_of_price(self, price_id: str | None) -> str | None:
        """The plan a Stripe price id stands for, if it is one of ours."""
        prices = {
            self.stripe_price_starter: "starter",
            self.stripe_price_professional: "professional",
            self.stripe_price_enterprise: "enterprise",
        }
        return prices.get(price_id) if price_id else None

    def price_of_plan(self, plan: str) -> str | None:
        """The Stripe price id configured for ``plan``, if any."""
        return {
            "starter": self.stripe_price_starter,
            "professional": self.stripe_price_professional,
            "enterprise": self.stripe_price_enterprise,
        }.get(plan)
