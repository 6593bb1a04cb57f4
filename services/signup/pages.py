"""The customer's pages: sign up, sign in and out, the account with its live deployment.

Each form handler reads the posted fields, checks the form's CSRF token, and calls the same
command as the JSON API (``signups.py``, ``logins.py``, ``account_view.py``), so the same
checks and rate limits hold; a refusal is shown next to the field it names, or as one message
with when to retry. Signing up or in sets the session cookie and sends the browser to
``/account``. Upgrading and the billing portal are billing's forms (``services/billing/pages.py``);
this page only renders them, and the few problem codes they come back with.
"""

from __future__ import annotations

from typing import Annotated, Any

import asyncpg
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.params import Parameter, QueryParameter
from litestar.response import Redirect, ServerSentEvent

from libs.http.app import client_address
from libs.http.auth import SessionTokens
from libs.http.errors import (
    Conflict,
    DomainError,
    InvalidRequest,
    NotFound,
    TooManyRequests,
    Unauthorized,
)
from libs.web.forms import (
    CSRF_FIELD,
    CsrfTokens,
    cleared_session_cookie,
    field_errors,
    form_fields,
    local_path,
    retry_in_words,
    session_cookie,
)
from services.signup.account_view import account_view
from services.signup.logins import Logins
from services.signup.models import AccountView, parse_login, parse_signup
from services.signup.progress import may_open_stream, progress_events, progress_of
from services.signup.settings import SignupSettings
from services.signup.signups import Signups
from services.signup.web import PAGES, signed_in, to_sign_in

FORM_BODY_LIMIT = 16 * 1024
SIGNUP_FIELDS = ("email", "password", "company_name", "full_name")
# The plans a customer can pay for, each a form on the account page (billing checks the plan).
PAID_PLANS = ("starter", "professional", "enterprise")
# What billing's forms and Stripe's return links may say, by code: the query string is never
# shown as text.
PROBLEMS = {
    "billing_not_configured": "Payments are not set up on this platform yet; nothing was charged.",
    "payment_provider_error": "The payment provider did not answer; nothing was charged. "
    "Please try again.",
    "unknown_plan": "That plan does not exist; choose one of the plans below.",
    "not_signed_in": "Your session ended; sign in again.",
    "billing_not_ready": "Your billing account is still being set up; try again in a few seconds.",
    "already_subscribed": "You already have a subscription: change its plan in Manage billing.",
    "no_billing_account": "There is nothing to manage yet: choose a paid plan first.",
    "billing_failed": "Billing could not do that just now; nothing was charged. Please try again.",
    "verification_limit": "We sent you several links already; please wait an hour before asking "
    "for another.",
}
NOTICES = {
    "success": "Thank you: your payment went through. Your plan changes as soon as the payment "
    "provider confirms it, usually within seconds.",
    "canceled": "Checkout was canceled; nothing was charged.",
    "verification_sent": "We sent you a new link: open it to verify your email address.",
}
SIGNED_OUT = "signed-out"
FIX_FIELDS = "Please correct the fields marked below."

NextPath = Annotated[str | None, QueryParameter(name="next", required=False)]
Code = Annotated[str | None, Parameter(required=False)]


def _address(request: Request[Any, Any, Any], settings: SignupSettings) -> str:
    return client_address(request, settings.trusted_proxy_hops)


def _retry_message(what: str, exc: TooManyRequests) -> str:
    seconds = int(exc.headers.get("Retry-After", "60"))
    return f"{what} Please try again {retry_in_words(seconds)}."


def _expired(exc: PermissionDeniedException) -> Response[str]:
    return PAGES.render("message.html", 403, title="Form expired", problem=exc.detail)


def _signup_form(
    request: Request[Any, Any, Any],
    csrf: CsrfTokens,
    values: dict[str, str],
    errors: dict[str, str] | Any,
    status: int = 200,
    problem: str | None = None,
) -> Response[str]:
    return PAGES.form(
        "signup.html",
        request,
        csrf,
        status,
        title="Start your free trial",
        values=values,
        errors=errors,
        problem=problem,
    )


def _login_form(
    request: Request[Any, Any, Any],
    csrf: CsrfTokens,
    target: str,
    email: str,
    status: int = 200,
    errors: dict[str, str] | Any = None,
    problem: str | None = None,
    notice: str | None = None,
) -> Response[str]:
    return PAGES.form(
        "login.html",
        request,
        csrf,
        status,
        title="Sign in",
        next_path=target,
        email=email,
        errors=errors or {},
        problem=problem,
        notice=notice,
    )


class AccountPages(Controller):
    """``/signup``, ``/login``, ``/logout``, ``/account`` and what the account page loads."""

    path = "/"
    include_in_schema = False

    @get("/")
    async def home(
        self,
        request: Request[Any, Any, Any],
        sessions: NamedDependency[SessionTokens],
        pool: NamedDependency[asyncpg.Pool],
    ) -> Redirect:
        """The platform's address: the account when signed in, otherwise the sign-up form."""
        signed = await signed_in(request, sessions, pool)
        return Redirect("/account" if signed else "/signup", status_code=303)

    @get("/signup")
    async def signup_page(
        self,
        request: Request[Any, Any, Any],
        sessions: NamedDependency[SessionTokens],
        pool: NamedDependency[asyncpg.Pool],
        csrf: NamedDependency[CsrfTokens],
    ) -> Response[Any]:
        """The sign-up form."""
        if await signed_in(request, sessions, pool):
            return Redirect("/account", status_code=303)
        return _signup_form(request, csrf, {}, {})

    @post("/signup", request_max_body_size=FORM_BODY_LIMIT)
    async def signup(
        self,
        request: Request[Any, Any, Any],
        signups: NamedDependency[Signups],
        sessions: NamedDependency[SessionTokens],
        csrf: NamedDependency[CsrfTokens],
    ) -> Response[Any]:
        """Open the account as ``POST /api/customers/signup`` does, then sign the browser in."""
        fields = await form_fields(request)
        try:
            csrf.check(request, fields.get(CSRF_FIELD))
        except PermissionDeniedException as exc:
            return _expired(exc)
        body = {name: fields[name] for name in SIGNUP_FIELDS if fields.get(name)}
        kept = {name: value for name, value in body.items() if name != "password"}
        try:
            form = parse_signup(body)
            answer = await signups.sign_up(form, _address(request, signups.settings))
        except InvalidRequest as exc:
            errors = field_errors(exc.fields)
            return _signup_form(request, csrf, kept, errors, 400, FIX_FIELDS)
        except Conflict:
            errors = {"email": "already has an account: sign in instead"}
            return _signup_form(request, csrf, kept, errors, 409)
        except TooManyRequests as exc:
            problem = _retry_message("Too many sign-ups from your network.", exc)
            return _signup_form(request, csrf, kept, {}, 429, problem)
        except DomainError as exc:
            return _signup_form(request, csrf, kept, {}, exc.status_code, exc.message)
        token = sessions.issue(answer.customer.customer_id, answer.customer.email)
        cookie = session_cookie(request, token, sessions.ttl_seconds)
        return Redirect("/account", status_code=303, cookies=[cookie])

    @get("/login")
    async def login_page(
        self,
        request: Request[Any, Any, Any],
        sessions: NamedDependency[SessionTokens],
        pool: NamedDependency[asyncpg.Pool],
        csrf: NamedDependency[CsrfTokens],
        next_path: NextPath = None,
        notice: Code = None,
    ) -> Response[Any]:
        """The sign-in form; ``next`` is where to go after (a path of ours)."""
        target = local_path(next_path)
        if await signed_in(request, sessions, pool):
            return Redirect(target, status_code=303)
        shown = "You are signed out." if notice == SIGNED_OUT else None
        return _login_form(request, csrf, target, "", notice=shown)

    @post("/login", request_max_body_size=FORM_BODY_LIMIT)
    async def login(
        self,
        request: Request[Any, Any, Any],
        logins: NamedDependency[Logins],
        csrf: NamedDependency[CsrfTokens],
    ) -> Response[Any]:
        """Sign in as ``POST /api/customers/login`` does (its limits too); one message for
        every wrong email or password."""
        fields = await form_fields(request)
        try:
            csrf.check(request, fields.get(CSRF_FIELD))
        except PermissionDeniedException as exc:
            return _expired(exc)
        target = local_path(fields.get("next"))
        email = fields.get("email", "").strip()
        try:
            form = parse_login({"email": email, "password": fields.get("password", "")})
            answer = await logins.log_in(form, _address(request, logins.settings))
        except InvalidRequest as exc:
            errors = field_errors(exc.fields)
            return _login_form(request, csrf, target, email, 400, errors=errors, problem=FIX_FIELDS)
        except Unauthorized:
            problem = "That email and password do not match an account."
            return _login_form(request, csrf, target, email, 401, problem=problem)
        except TooManyRequests as exc:
            problem = _retry_message("Too many sign-in attempts.", exc)
            return _login_form(request, csrf, target, email, 429, problem=problem)
        except DomainError as exc:
            return _login_form(request, csrf, target, email, exc.status_code, problem=exc.message)
        cookie = session_cookie(request, answer.token, answer.token_expires_in)
        return Redirect(target, status_code=303, cookies=[cookie])

    @post("/logout", request_max_body_size=FORM_BODY_LIMIT)
    async def logout(
        self, request: Request[Any, Any, Any], csrf: NamedDependency[CsrfTokens]
    ) -> Response[Any]:
        """Sign the browser out (a form with its CSRF token, so no other site can)."""
        fields = await form_fields(request)
        try:
            csrf.check(request, fields.get(CSRF_FIELD))
        except PermissionDeniedException as exc:
            return _expired(exc)
        return Redirect(
            f"/login?notice={SIGNED_OUT}", status_code=303, cookies=[cleared_session_cookie()]
        )

    @get("/account")
    async def account(
        self,
        request: Request[Any, Any, Any],
        sessions: NamedDependency[SessionTokens],
        pool: NamedDependency[asyncpg.Pool],
        settings: NamedDependency[SignupSettings],
        csrf: NamedDependency[CsrfTokens],
        problem: Code = None,
        checkout: Code = None,
        notice: Code = None,
    ) -> Response[Any]:
        """The signed-in customer's account: plan, instance, license, usage and billing."""
        customer_id = await signed_in(request, sessions, pool)
        if customer_id is None:
            return to_sign_in("/account")
        view = await _account_or_none(pool, customer_id)
        if view is not None and view.closed_at is not None:
            return Redirect("/login", status_code=303, cookies=[cleared_session_cookie()])
        return PAGES.form(
            "account.html",
            request,
            csrf,
            form_targets=settings.payment_form_origins.split(),
            title="Your account",
            account=view,
            progress=progress_of(view.deployment) if view is not None else None,
            usage=view.usage if view is not None else None,
            invoices=view.invoices if view is not None else [],
            email_verified=view.email_verified if view is not None else True,
            plans=PAID_PLANS,
            problem=PROBLEMS.get(problem or ""),
            notice=NOTICES.get(checkout or notice or ""),
        )

    @get("/account/progress", media_type="text/event-stream")
    async def progress(
        self,
        request: Request[Any, Any, Any],
        sessions: NamedDependency[SessionTokens],
        pool: NamedDependency[asyncpg.Pool],
    ) -> ServerSentEvent:
        """The deployment's status and step as server-sent events, read from the account view
        every ``POLL_SECONDS``, until it is ready or has failed."""
        customer_id = await signed_in(request, sessions, pool)
        if customer_id is None:
            raise NotAuthorizedException("sign in first")
        if not may_open_stream(customer_id):
            raise TooManyRequests("too many progress streams open; close a tab", 5)
        return ServerSentEvent(
            progress_events(pool, customer_id),
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @get("/account/license.jwt")
    async def license_file(
        self,
        request: Request[Any, Any, Any],
        sessions: NamedDependency[SessionTokens],
        pool: NamedDependency[asyncpg.Pool],
    ) -> Response[Any]:
        """The customer's current license, as a file to download."""
        customer_id = await signed_in(request, sessions, pool)
        if customer_id is None:
            return to_sign_in("/account")
        view = await _account_or_none(pool, customer_id)
        if view is None or view.license.jwt is None:
            return PAGES.render(
                "message.html",
                404,
                title="No license yet",
                problem="No license has been issued yet; it comes within seconds of signing up.",
            )
        return Response(
            view.license.jwt,
            media_type="application/jwt",
            headers={
                "Content-Disposition": 'attachment; filename="iotistic-license.jwt"',
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
            },
        )


async def _account_or_none(pool: asyncpg.Pool, customer_id: str) -> AccountView | None:
    """The account view; None while signup has not projected the account yet."""
    try:
        return await account_view(pool, customer_id)
    except NotFound:
        return None
