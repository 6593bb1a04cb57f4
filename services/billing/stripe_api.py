"""Billing's outgoing calls to Stripe: customers, Checkout Sessions, billing-portal sessions, and
canceling the subscription of an account that closed.

Every call goes through the ``stripe`` package, async over httpx, to ``STRIPE_API_BASE``
(Stripe itself unless changed; the tests point it at a stand-in). Each creating call carries an
idempotency key derived from what it is for, so a retried request, or two concurrent ones,
get the same Stripe object back instead of a second customer or session.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import stripe
from stripe.params import CustomerCreateParams
from stripe.params.billing_portal import SessionCreateParams as PortalParams
from stripe.params.checkout import SessionCreateParams as CheckoutParams

from libs.http.errors import DomainError, UpstreamError
from services.billing.settings import BillingSettings

log = logging.getLogger(__name__)


class StripeUnavailable(UpstreamError):
    """502: Stripe did not answer, or refused what we asked; nothing was charged."""

    code = "payment_provider_error"


class StripeNotConfigured(DomainError):
    """503: this deployment has no Stripe key or no price for the plan."""

    status_code = 503
    code = "billing_not_configured"


@dataclass(frozen=True)
class CheckoutSession:
    """What the customer needs to pay: the page to go to, and its id."""

    id: str
    url: str
    expires_at: int | None


class StripeGateway:
    """The Stripe calls billing makes, with their idempotency and error handling."""

    def __init__(self, settings: BillingSettings) -> None:
        """Builds no client until the first call, so a deployment without a key still starts."""
        self._settings = settings
        self._client: stripe.StripeClient | None = None

    def _stripe(self) -> stripe.StripeClient:
        if not self._settings.stripe_secret_key:
            raise StripeNotConfigured("payments are not set up here: STRIPE_SECRET_KEY is unset")
        if self._client is None:
            self._client = stripe.StripeClient(
                self._settings.stripe_secret_key,
                base_addresses={"api": self._settings.stripe_api_base.rstrip("/")},
                http_client=stripe.HTTPXClient(timeout=self._settings.stripe_timeout_seconds),
                max_network_retries=2,
            )
        return self._client

    async def create_customer(
        self, customer_id: str, email: str | None, company_name: str | None
    ) -> str:
        """Stripe's customer for ours (``metadata.customer_id``); the same one when retried."""
        params: CustomerCreateParams = {"metadata": {"customer_id": customer_id}}
        if email:
            params["email"] = email
        if company_name:
            params["name"] = company_name
        try:
            created = await self._stripe().v1.customers.create_async(
                params, {"idempotency_key": f"iotistic-customer-{customer_id}"}
            )
        except stripe.StripeError as exc:
            raise _unavailable("create the Stripe customer", exc) from None
        return str(created.id)

    async def create_checkout(
        self, *, customer_id: str, stripe_customer_id: str, plan: str, attempt: str
    ) -> CheckoutSession:
        """A Checkout Session in subscription mode for ``plan``'s price.

        ``metadata.customer_id`` is set on the session and on the subscription it creates, so
        every later Stripe event about it names our customer. ``attempt`` makes the idempotency
        key: the same attempt retried gets the same session.
        """
        price = self._settings.price_of_plan(plan)
        if not price:
            raise StripeNotConfigured(f"no Stripe price is configured for plan {plan!r}")
        back = self._settings.billing_return_url
        separator = "&" if "?" in back else "?"
        params: CheckoutParams = {
            "mode": "subscription",
            "customer": stripe_customer_id,
            "client_reference_id": customer_id,
            "line_items": [{"price": price, "quantity": 1}],
            "metadata": {"customer_id": customer_id, "plan": plan},
            "subscription_data": {"metadata": {"customer_id": customer_id, "plan": plan}},
            "success_url": f"{back}{separator}checkout=success&session_id={{CHECKOUT_SESSION_ID}}",
            "cancel_url": f"{back}{separator}checkout=canceled",
        }
        try:
            session = await self._stripe().v1.checkout.sessions.create_async(
                params, {"idempotency_key": f"iotistic-checkout-{customer_id}-{plan}-{attempt}"}
            )
        except stripe.StripeError as exc:
            raise _unavailable("create the checkout session", exc) from None
        if not session.url:
            raise StripeUnavailable("Stripe returned a checkout session without a URL")
        return CheckoutSession(id=str(session.id), url=session.url, expires_at=session.expires_at)

    async def create_portal(self, stripe_customer_id: str) -> str:
        """A billing-portal session where the customer changes plan, card or cancels."""
        params: PortalParams = {
            "customer": stripe_customer_id,
            "return_url": self._settings.billing_return_url,
        }
        try:
            session = await self._stripe().v1.billing_portal.sessions.create_async(params)
        except stripe.StripeError as exc:
            raise _unavailable("create the billing-portal session", exc) from None
        return str(session.url)

    async def cancel_subscription(self, stripe_subscription_id: str) -> bool:
        """Cancel a subscription at once (a closed account's): True when Stripe canceled it,
        False when Stripe says there is nothing to cancel (unknown, or canceled already)."""
        try:
            await self._stripe().v1.subscriptions.cancel_async(
                stripe_subscription_id,
                options={"idempotency_key": f"iotistic-cancel-{stripe_subscription_id}"},
            )
        except stripe.InvalidRequestError as exc:
            log.warning(
                "stripe: subscription %s not canceled: %s (request %s)",
                stripe_subscription_id,
                exc.code,
                exc.request_id,
            )
            return False
        except stripe.StripeError as exc:
            raise _unavailable("cancel the subscription", exc) from None
        return True


def _unavailable(what: str, exc: stripe.StripeError) -> StripeUnavailable:
    # Stripe's messages mask keys; the request id lets support find the call in Stripe's logs.
    log.warning(
        "stripe: could not %s: %s (status %s, request %s)",
        what,
        type(exc).__name__,
        exc.http_status,
        exc.request_id,
    )
    return StripeUnavailable(f"could not {what}; nothing was charged, please try again")
