"""Settings of the billing service, on top of the common ones."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from libs.config import ServiceSettings


class BillingSettings(ServiceSettings, frozen=True, kw_only=True):
    """Stripe's webhook secret and how old a signed webhook may be."""

    # whsec_... from Stripe's dashboard; unset refuses every webhook (503) rather than trust one.
    stripe_webhook_secret: Annotated[str, Meta(min_length=8)] | None = None
    # Stripe's own default: a signature older than this is refused as a possible replay.
    stripe_webhook_tolerance_seconds: Annotated[int, Meta(ge=1, le=3600)] = 300
    # How often the trial scheduler looks for trials that ended unpaid.
    trial_scan_seconds: Annotated[float, Meta(gt=0, le=3600)] = 60.0
    # Stripe price ids of the plans (price_...): a subscription's plan is read from its price.
    stripe_price_starter: str | None = None
    stripe_price_professional: str | None = None
    stripe_price_enterprise: str | None = None

    def plan_of_price(self, price_id: str | None) -> str | None:
        """The plan a Stripe price id stands for, if it is one of ours."""
        prices = {
            self.stripe_price_starter: "starter",
            self.stripe_price_professional: "professional",
            self.stripe_price_enterprise: "enterprise",
        }
        return prices.get(price_id) if price_id else None
