"""The account page's billing forms: upgrade to a plan, and manage billing at Stripe.

The account page (signup's) renders these forms; they post here, with the browser's session
cookie and the form's CSRF token, and are answered with a redirect: to Stripe's Checkout page
or billing portal, from the same ``BillingAccounts`` commands as ``POST /api/billing/checkout``
and ``/api/billing/portal``; or back to ``/account?problem=<code>``, a code from a fixed set the
page has a message for (nothing a client wrote is ever shown back).
"""

from __future__ import annotations

import hashlib
from typing import Any

from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency
from litestar.response import Redirect

from libs.http.errors import Conflict, DomainError, NotFound
from libs.web.forms import (
    CSRF_COOKIE,
    CSRF_FIELD,
    CsrfTokens,
    form_fields,
    session_token,
)
from services.billing.access import CustomerSessions
from services.billing.accounts import AccountClosed, BillingAccounts
from services.billing.decisions import PAID_PLANS
from services.billing.stripe_api import StripeNotConfigured, StripeUnavailable

FORM_BODY_LIMIT = 4 * 1024
ACCOUNT_PAGE = "/account"


def back_with(problem: str) -> Redirect:
    """Back to the account page, which says what ``problem`` means."""
    return Redirect(f"{ACCOUNT_PAGE}?problem={problem}", status_code=303)


def problem_of(exc: DomainError, refused: str) -> str:
    """The account page's code for a billing command's refusal (``refused`` for a 409)."""
    if isinstance(exc, AccountClosed):
        return "not_signed_in"  # a closed account's session ends: the page asks to sign in
    if isinstance(exc, StripeNotConfigured):
        return "billing_not_configured"
    if isinstance(exc, StripeUnavailable):
        return "payment_provider_error"
    if isinstance(exc, NotFound):
        return "billing_not_ready"
    if isinstance(exc, Conflict):
        return refused
    return "billing_failed"


def checkout_attempt(request: Request[Any, Any, Any], customer_id: str, plan: str) -> str:
    """The idempotency key of an upgrade: the same for one browser's form sent twice (a
    double-click gets the same Checkout page), different for another browser or plan."""
    value = request.cookies.get(CSRF_COOKIE, "")
    return hashlib.sha256(f"{value}:{customer_id}:{plan}".encode()).hexdigest()[:40]


class AccountBillingForms(Controller):
    """``POST /account/upgrade`` and ``POST /account/billing``, from the account page."""

    path = ACCOUNT_PAGE
    include_in_schema = False

    @post("/upgrade", request_max_body_size=FORM_BODY_LIMIT)
    async def upgrade(
        self,
        request: Request[Any, Any, Any],
        csrf: NamedDependency[CsrfTokens],
        sessions: NamedDependency[CustomerSessions],
        accounts: NamedDependency[BillingAccounts],
    ) -> Response[Any]:
        """Off to Stripe's Checkout page for the plan chosen (403 for a forged form)."""
        fields = await form_fields(request)
        csrf.check(request, fields.get(CSRF_FIELD))
        customer_id = await sessions.customer_of(session_token(request))
        if customer_id is None:
            return back_with("not_signed_in")
        plan = fields.get("plan", "")
        if plan not in PAID_PLANS:
            return back_with("unknown_plan")
        attempt = checkout_attempt(request, customer_id, plan)
        try:
            session = await accounts.checkout(customer_id, plan, attempt)
        except DomainError as exc:
            return back_with(problem_of(exc, "already_subscribed"))
        return Redirect(session["checkout_url"], status_code=303)

    @post("/billing", request_max_body_size=FORM_BODY_LIMIT)
    async def billing(
        self,
        request: Request[Any, Any, Any],
        csrf: NamedDependency[CsrfTokens],
        sessions: NamedDependency[CustomerSessions],
        accounts: NamedDependency[BillingAccounts],
    ) -> Response[Any]:
        """Off to Stripe's billing portal (403 for a forged form)."""
        fields = await form_fields(request)
        csrf.check(request, fields.get(CSRF_FIELD))
        customer_id = await sessions.customer_of(session_token(request))
        if customer_id is None:
            return back_with("not_signed_in")
        try:
            portal = await accounts.portal(customer_id)
        except DomainError as exc:
            return back_with(problem_of(exc, "no_billing_account"))
        return Redirect(portal["portal_url"], status_code=303)
