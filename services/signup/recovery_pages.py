"""The pages of forgotten passwords, email verification and closing an account.

``/forgot`` asks for a reset link, ``/reset`` sets a new password with it (the token comes in
the link's query string and goes on in a hidden field; it is never logged) and signs the
browser in, ``/verify`` opens a verification link, ``/account/close`` closes the signed-in
customer's account. Each form carries a CSRF token and is refused (403) without the right one;
each calls the same command as the JSON API, so the same checks and limits hold, and a refusal
names its field next to it.
"""

from __future__ import annotations

from typing import Annotated, Any

import asyncpg
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import QueryParameter
from litestar.response import Redirect

from libs.http.app import client_address
from libs.http.auth import SessionTokens
from libs.http.errors import DomainError, TooManyRequests
from libs.web.forms import (
    CSRF_FIELD,
    CsrfTokens,
    cleared_session_cookie,
    field_errors,
    form_fields,
    session_cookie,
    session_token,
)
from services.signup.closing import Closings, parse_close
from services.signup.recovery import PasswordResets, parse_reset_confirm, parse_reset_request
from services.signup.recovery_sessions import customer_in_session
from services.signup.verification import Verifications
from services.signup.web import PAGES, to_sign_in

FORM_LIMIT = 16 * 1024
# The token of a mailed link (anything else is refused by the command, never echoed long).
LinkToken = Annotated[str, QueryParameter(name="token", description="the mailed link's token")]
CLOSE_PATH = "/account/close"
VERIFY_SAYS = {
    "verified": "Thank you: your email address is verified.",
    "already_verified": "This link was used already: your email address is verified.",
    "invalid": "This link is not valid, or it has expired. Sign in and ask for a new one on "
    "your account page.",
}


def _page(
    template: str,
    request: Request[Any, Any, Any],
    csrf: CsrfTokens,
    status_code: int = 200,
    **context: Any,
) -> Response[str]:
    """``template`` with a fresh CSRF token for its form, and no errors unless given."""
    context.setdefault("errors", {})
    return PAGES.form(template, request, csrf, status_code, **context)


async def _checked_form(request: Request[Any, Any, Any], csrf: CsrfTokens) -> dict[str, str]:
    """The posted form's fields, once its CSRF token is this browser's (403 otherwise)."""
    fields = await form_fields(request)
    csrf.check(request, fields.get(CSRF_FIELD))
    return fields


def _refusal(exc: DomainError) -> tuple[dict[str, str], str | None]:
    """A refusal as errors next to fields, and a sentence for what no field shows."""
    errors = dict(field_errors(exc.fields))
    problem = None if errors else exc.message
    return errors, problem


class RecoveryPages(Controller):
    """``/forgot``, ``/reset``, ``/verify``, ``/account/close``."""

    include_in_schema = False

    @get("/forgot")
    async def forgot(
        self, request: Request[Any, Any, Any], csrf: NamedDependency[CsrfTokens]
    ) -> Response[str]:
        """Ask for a link to choose a new password."""
        return _page("forgot.html", request, csrf, title="Forgotten password", email="")

    @post("/forgot", request_max_body_size=FORM_LIMIT)
    async def forgot_sent(
        self,
        request: Request[Any, Any, Any],
        csrf: NamedDependency[CsrfTokens],
        resets: NamedDependency[PasswordResets],
    ) -> Response[str]:
        """Mail the link (if the email has an account); the same page either way."""
        fields = await _checked_form(request, csrf)
        email = fields.get("email", "")
        try:
            answer = await resets.request_reset(
                parse_reset_request({"email": email}),
                client_address(request, resets.settings.trusted_proxy_hops),
            )
        except DomainError as exc:
            errors, problem = _refusal(exc)
            return _page(
                "forgot.html",
                request,
                csrf,
                exc.status_code,
                title="Forgotten password",
                email=email,
                errors=errors,
                problem=problem,
            )
        return _page(
            "forgot.html",
            request,
            csrf,
            title="Check your mail",
            email=email,
            sent=True,
            notice=answer.message,
        )

    @get("/reset")
    async def reset(
        self,
        request: Request[Any, Any, Any],
        csrf: NamedDependency[CsrfTokens],
        token: LinkToken = "",
    ) -> Response[str]:
        """The form for a new password, with the link's token in a hidden field."""
        return _page("reset.html", request, csrf, title="Choose a new password", token=token[:200])

    @post("/reset", request_max_body_size=FORM_LIMIT)
    async def reset_done(
        self,
        request: Request[Any, Any, Any],
        csrf: NamedDependency[CsrfTokens],
        resets: NamedDependency[PasswordResets],
    ) -> Response[Any]:
        """Set the new password; the browser is signed in and goes to its account."""
        fields = await _checked_form(request, csrf)
        token = fields.get("token", "")
        try:
            parsed = parse_reset_confirm({"token": token, "password": fields.get("password")})
            done = await resets.confirm_reset(
                *parsed, client_address(request, resets.settings.trusted_proxy_hops)
            )
        except DomainError as exc:
            errors, problem = _refusal(exc)
            if "token" in errors:
                problem = f"This link {errors.pop('token')}."
            return _page(
                "reset.html",
                request,
                csrf,
                exc.status_code,
                title="Choose a new password",
                token=token[:200],
                errors=errors,
                problem=problem,
            )
        cookie = session_cookie(request, done.token, done.token_expires_in)
        return Redirect("/account", status_code=303, cookies=[cookie])

    @get("/verify")
    async def verify(
        self,
        request: Request[Any, Any, Any],
        csrf: NamedDependency[CsrfTokens],
        verifications: NamedDependency[Verifications],
        token: LinkToken = "",
    ) -> Response[str]:
        """Open a verification link."""
        outcome = await verifications.verify(token)
        return _page(
            "verify.html",
            request,
            csrf,
            200 if outcome != "invalid" else 400,
            title="Email address",
            outcome=outcome,
            says=VERIFY_SAYS[outcome],
        )

    @post("/account/verification", request_max_body_size=FORM_LIMIT)
    async def resend_verification(
        self,
        request: Request[Any, Any, Any],
        sessions: NamedDependency[SessionTokens],
        csrf: NamedDependency[CsrfTokens],
        verifications: NamedDependency[Verifications],
    ) -> Response[Any]:
        """Mail a new verification link; back to the account page, which says what happened."""
        await _checked_form(request, csrf)
        customer_id = await customer_in_session(
            verifications.pool, sessions, session_token(request)
        )
        if customer_id is None:
            return to_sign_in("/account")
        try:
            await verifications.resend(customer_id)
        except TooManyRequests:
            return Redirect("/account?problem=verification_limit", status_code=303)
        return Redirect("/account?notice=verification_sent", status_code=303)

    @get(CLOSE_PATH)
    async def close_form(
        self,
        request: Request[Any, Any, Any],
        sessions: NamedDependency[SessionTokens],
        csrf: NamedDependency[CsrfTokens],
        closings: NamedDependency[Closings],
    ) -> Response[Any]:
        """What closing does, an export first, and the form (signed-in customers only)."""
        customer_id = await customer_in_session(closings.pool, sessions, session_token(request))
        if customer_id is None:
            return to_sign_in(CLOSE_PATH)
        account = await _account(closings.pool, customer_id)
        return _page(
            "close.html", request, csrf, title="Close your account", account=account, reason=""
        )

    @post(CLOSE_PATH, request_max_body_size=FORM_LIMIT)
    async def close(
        self,
        request: Request[Any, Any, Any],
        sessions: NamedDependency[SessionTokens],
        csrf: NamedDependency[CsrfTokens],
        closings: NamedDependency[Closings],
    ) -> Response[Any]:
        """Close the account; the browser is signed out and told what happens next."""
        fields = await _checked_form(request, csrf)
        customer_id = await customer_in_session(
            closings.pool, sessions, session_token(request), closed_ok=True
        )
        if customer_id is None:
            return to_sign_in(CLOSE_PATH)
        reason = fields.get("reason", "")
        try:
            form = parse_close(
                {
                    "password": fields.get("password", ""),
                    "erase": fields.get("erase") == "yes",
                    "reason": reason,
                }
            )
            closed = await closings.close(
                customer_id, form, client_address(request, closings.settings.trusted_proxy_hops)
            )
        except DomainError as exc:
            errors, problem = _refusal(exc)
            return _page(
                "close.html",
                request,
                csrf,
                exc.status_code,
                title="Close your account",
                account=await _account(closings.pool, customer_id),
                reason=reason,
                errors=errors,
                problem=problem,
            )
        return PAGES.render(
            "close.html",
            title="Account closed",
            closed=closed,
            account=None,
            csrf_token="",
            errors={},
            reason="",
            cookies=[cleared_session_cookie()],
        )


async def _account(pool: asyncpg.Pool, customer_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        "SELECT email, instance_url, subscription_status, plan FROM accounts "
        "WHERE customer_id = $1",
        customer_id,
    )
