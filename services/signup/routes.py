"""The public signup API: thin translations between HTTP and the signup commands.

Each handler reads what the request says and hands it to ``signups.py``, ``logins.py`` or
``account_view.py``; a keyed signup goes through ``idempotency.py``. What they need comes in
as litestar dependencies, made per request from the service's runtime (``signup_routes``).
"""

from __future__ import annotations

from typing import Annotated, Any

import asyncpg
from litestar import Controller, Request, Response, Router, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import HeaderParameter, JSONBody
from litestar.types import ControllerRouterHandler

from libs.http.app import client_address
from libs.http.auth import LOGIN_RELAY_HEADER, SessionTokens, verify_relayed_client
from libs.runtime.service import ServiceRuntime
from libs.web.forms import CsrfTokens
from libs.web.pages import static_files
from services.signup.account_view import account_view
from services.signup.admin_pages import admin_customers_router
from services.signup.erasure import erasure_router
from services.signup.idempotency import answer_once
from services.signup.logins import Logins
from services.signup.models import AccountView, LoginAnswer, parse_login, parse_signup
from services.signup.pages import AccountPages
from services.signup.passwords import Passwords
from services.signup.recovery_routes import recovery_routes
from services.signup.recovery_sessions import require_session
from services.signup.settings import SignupSettings
from services.signup.signups import Signups, signups_counter
from services.signup.web import STATIC_PREFIX

BODY_LIMIT = 16 * 1024
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        max_length=255,
        required=False,
        description="Retrying with the same key returns the first answer",
    ),
]


class CustomersController(Controller):
    """``POST /api/customers/signup``, ``POST /api/customers/login``, ``GET /api/customers/me``."""

    path = "/api/customers"
    tags = ("customers",)

    @post("/signup", status_code=201, request_max_body_size=BODY_LIMIT)
    async def signup(
        self,
        data: JSONBody[dict[str, Any]],
        request: Request[Any, Any, Any],
        signups: NamedDependency[Signups],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Any]:
        """Sign a customer up: account, trial and license, deployment under way."""
        form = parse_signup(data)
        address = client_address(request, signups.settings.trusted_proxy_hops)
        if idempotency_key is None:
            return Response(await signups.sign_up(form, address), status_code=201)
        status, answer = await answer_once(
            signups.pool, idempotency_key, form, lambda: signups.sign_up(form, address)
        )
        return Response(answer, status_code=status)

    @post("/login", status_code=200, request_max_body_size=BODY_LIMIT)
    async def login(
        self,
        data: JSONBody[dict[str, Any]],
        request: Request[Any, Any, Any],
        logins: NamedDependency[Logins],
    ) -> LoginAnswer:
        """A session token for the customer's own routes."""
        form = parse_login(data)
        settings = logins.settings
        relayed = verify_relayed_client(
            request.headers.get(LOGIN_RELAY_HEADER), settings.login_relay_secret, form.email
        )
        address = client_address(request, settings.trusted_proxy_hops)
        return await logins.log_in(form, address, relayed)

    @get("/me")
    async def me(
        self, session_customer_id: NamedDependency[str], pool: NamedDependency[asyncpg.Pool]
    ) -> AccountView:
        """The customer's account: subscription, license, deployment and instance URLs."""
        return await account_view(pool, session_customer_id)


def signup_routes(runtime: ServiceRuntime) -> list[ControllerRouterHandler]:
    """``POST /api/customers/signup``, ``POST /api/customers/login``, ``GET /api/customers/me``,
    and the customer's pages (``pages.py``)."""
    settings = runtime.settings_as(SignupSettings)
    passwords = Passwords(
        memory_kib=settings.argon2_memory_kib,
        time_cost=settings.argon2_time_cost,
        parallelism=settings.argon2_parallelism,
        workers=settings.hash_workers,
    )
    sessions = SessionTokens(settings.session_secret, settings.session_ttl_seconds)
    csrf = CsrfTokens(settings.session_secret)

    # Closures, not bound methods: litestar deep-copies a router's dependencies as it mounts
    # them, and a bound method would take the whole runtime along. Each is made per request:
    # the pool and the log are there only once the service has started.
    opened = signups_counter(runtime.registry)

    def signups() -> Signups:
        return Signups(runtime.db(), runtime.events(), passwords, settings, opened)

    def logins() -> Logins:
        return Logins(runtime.db(), passwords, sessions, settings)

    def pool() -> asyncpg.Pool:
        return runtime.db()

    async def session_customer_id(request: Request[Any, Any, Any]) -> str:
        # Not a session issued before a password reset, nor one of a closed account.
        return await require_session(runtime.db(), sessions, request)

    return [
        static_files(STATIC_PREFIX),
        admin_customers_router(runtime),
        erasure_router(runtime),
        Router(
            "/",
            route_handlers=[CustomersController, AccountPages],
            dependencies={
                "signups": Provide(signups, sync_to_thread=False),
                "logins": Provide(logins, sync_to_thread=False),
                "pool": Provide(pool, sync_to_thread=False),
                "session_customer_id": Provide(session_customer_id),
                "sessions": Provide(lambda: sessions, sync_to_thread=False),
                "csrf": Provide(lambda: csrf, sync_to_thread=False),
                "settings": Provide(lambda: settings, sync_to_thread=False),
            },
        ),
        recovery_routes(runtime, passwords, sessions),
    ]
