"""Routes of forgotten passwords, email verification and closing an account: the JSON API
(``RecoveryController``) and its pages (``recovery_pages.py``), under one router whose
dependencies make the commands per request from the service's runtime.

``POST /api/customers/password-reset``, ``POST /api/customers/password-reset/confirm``,
``POST /api/customers/me/verification``, ``POST /api/customers/me/close``.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Router, post
from litestar.di import NamedDependency, Provide
from litestar.params import JSONBody

from libs.http.app import client_address
from libs.http.auth import SessionTokens
from libs.runtime.outbox import outbox_relay
from libs.runtime.service import ServiceRuntime
from libs.web.forms import CsrfTokens
from services.signup.closing import AccountClosed, Closings, parse_close
from services.signup.mail import mail_relay
from services.signup.passwords import Passwords
from services.signup.recovery import (
    PasswordReset,
    PasswordResets,
    ResetRequested,
    parse_reset_confirm,
    parse_reset_request,
)
from services.signup.recovery_pages import RecoveryPages
from services.signup.recovery_sessions import require_session
from services.signup.settings import SignupSettings
from services.signup.verification import Verifications, VerificationSent

BODY_LIMIT = 16 * 1024


class RecoveryController(Controller):
    """Forgotten passwords, verification mails again, closing the account."""

    path = "/api/customers"
    tags = ("customers",)

    @post("/password-reset", status_code=202, request_max_body_size=BODY_LIMIT)
    async def request_reset(
        self,
        data: JSONBody[dict[str, Any]],
        request: Request[Any, Any, Any],
        resets: NamedDependency[PasswordResets],
    ) -> ResetRequested:
        """Mail a link to set a new password; the same 202 whether or not the email has an
        account."""
        email = parse_reset_request(data)
        address = client_address(request, resets.settings.trusted_proxy_hops)
        return await resets.request_reset(email, address)

    @post("/password-reset/confirm", status_code=200, request_max_body_size=BODY_LIMIT)
    async def confirm_reset(
        self,
        data: JSONBody[dict[str, Any]],
        request: Request[Any, Any, Any],
        resets: NamedDependency[PasswordResets],
    ) -> PasswordReset:
        """Set a new password with a reset link's token: older sessions stop working, and the
        answer carries a new one."""
        token, password = parse_reset_confirm(data)
        address = client_address(request, resets.settings.trusted_proxy_hops)
        return await resets.confirm_reset(token, password, address)

    @post("/me/verification", status_code=202)
    async def resend_verification(
        self,
        request: Request[Any, Any, Any],
        verifications: NamedDependency[Verifications],
        sessions: NamedDependency[SessionTokens],
    ) -> VerificationSent:
        """Mail the signed-in customer a new link to verify their email (limited)."""
        customer_id = await require_session(verifications.pool, sessions, request)
        return await verifications.resend(customer_id)

    @post("/me/close", status_code=200, request_max_body_size=BODY_LIMIT)
    async def close(
        self,
        data: JSONBody[dict[str, Any]],
        request: Request[Any, Any, Any],
        closings: NamedDependency[Closings],
        sessions: NamedDependency[SessionTokens],
    ) -> AccountClosed:
        """Close the signed-in customer's account, the password entered again; a retry gets
        the same outcome."""
        # A closed account's session may ask again: it hears the outcome, nothing more.
        customer_id = await require_session(closings.pool, sessions, request, closed_ok=True)
        form = parse_close(data)
        address = client_address(request, closings.settings.trusted_proxy_hops)
        return await closings.close(customer_id, form, address)


def recovery_routes(
    runtime: ServiceRuntime, passwords: Passwords, sessions: SessionTokens
) -> Router:
    """The recovery API and pages, with what they need per request."""
    settings = runtime.settings_as(SignupSettings)

    def wake_mail() -> None:
        mail_relay(runtime).wake()

    def wake_events() -> None:
        outbox_relay(runtime).wake()

    def resets() -> PasswordResets:
        return PasswordResets(runtime.db(), passwords, sessions, settings, wake_mail, wake_events)

    def verifications() -> Verifications:
        return Verifications(runtime.db(), settings, wake_mail, wake_events)

    def closings() -> Closings:
        return Closings(runtime.db(), passwords, settings, wake_events)

    def session_tokens() -> SessionTokens:
        return sessions

    csrf_tokens = CsrfTokens(settings.session_secret)

    def csrf() -> CsrfTokens:
        return csrf_tokens

    return Router(
        "/",
        route_handlers=[RecoveryController, RecoveryPages],
        dependencies={
            "resets": Provide(resets, sync_to_thread=False),
            "verifications": Provide(verifications, sync_to_thread=False),
            "closings": Provide(closings, sync_to_thread=False),
            "sessions": Provide(session_tokens, sync_to_thread=False),
            "csrf": Provide(csrf, sync_to_thread=False),
        },
    )
