"""The public signup API: thin translations between HTTP and the signup handlers."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post
from litestar.params import HeaderParameter, JSONBody
from litestar.types import ControllerRouterHandler

from libs.http.app import client_address
from libs.http.auth import LOGIN_RELAY_HEADER, SessionTokens, verify_relayed_client
from libs.http.errors import DomainError, InvalidRequest, TooManyRequests, error_body
from libs.runtime.service import ServiceRuntime
from services.signup.handlers import (
    SignupService,
    claim_idempotency_key,
    release_idempotency_key,
    remember_answer,
    request_fingerprint,
)
from services.signup.models import AccountView, LoginAnswer, parse_login, parse_signup
from services.signup.passwords import Passwords
from services.signup.settings import SignupSettings

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


def signup_routes(runtime: ServiceRuntime) -> list[ControllerRouterHandler]:
    """``POST /api/customers/signup``, ``POST /api/customers/login``, ``GET /api/customers/me``."""
    settings = runtime.settings_as(SignupSettings)
    passwords = Passwords(
        memory_kib=settings.argon2_memory_kib,
        time_cost=settings.argon2_time_cost,
        parallelism=settings.argon2_parallelism,
        workers=settings.hash_workers,
    )
    sessions = SessionTokens(settings.session_secret, settings.session_ttl_seconds)

    def service() -> SignupService:
        return SignupService(runtime.db(), runtime.events(), passwords, sessions, settings)

    @post(
        "/api/customers/signup",
        status_code=201,
        request_max_body_size=BODY_LIMIT,
        tags=["customers"],
    )
    async def signup(
        data: JSONBody[dict[str, Any]],
        request: Request[Any, Any, Any],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Any]:
        """Sign a customer up: account, trial and license, deployment under way."""
        form = parse_signup(data)
        signups = service()
        address = client_address(request, settings.trusted_proxy_hops)
        if idempotency_key is None:
            return Response(await signups.sign_up(form, address), status_code=201)
        if not idempotency_key.isprintable() or not idempotency_key.strip():
            raise InvalidRequest(
                "invalid request",
                fields=[{"field": "Idempotency-Key", "reason": "must be printable text"}],
            )
        pool = signups.pool
        # A retry of a signup that was answered gets that answer, before any limit is counted.
        stored = await claim_idempotency_key(pool, idempotency_key, request_fingerprint(form))
        if stored is not None:
            return Response(stored[1], status_code=stored[0])
        try:
            answer = await signups.sign_up(form, address)
        except DomainError as exc:
            if exc.status_code >= 500 or isinstance(exc, TooManyRequests):
                # Passing: a retry (after Retry-After) runs again.
                await release_idempotency_key(pool, idempotency_key)
            else:  # a refusal is the answer; a retry gets it again
                await remember_answer(
                    pool,
                    idempotency_key,
                    exc.status_code,
                    error_body(exc.status_code, exc.code, exc.message),
                )
            raise
        except BaseException:
            await release_idempotency_key(pool, idempotency_key)
            raise
        await remember_answer(pool, idempotency_key, 201, msgspec.to_builtins(answer))
        return Response(answer, status_code=201)

    @post(
        "/api/customers/login",
        status_code=200,
        request_max_body_size=BODY_LIMIT,
        tags=["customers"],
    )
    async def login(data: JSONBody[dict[str, Any]], request: Request[Any, Any, Any]) -> LoginAnswer:
        """A session token for the customer's own routes."""
        form = parse_login(data)
        relayed = verify_relayed_client(
            request.headers.get(LOGIN_RELAY_HEADER), settings.login_relay_secret, form.email
        )
        address = client_address(request, settings.trusted_proxy_hops)
        return await service().log_in(form, address, relayed)

    @get("/api/customers/me", tags=["customers"])
    async def me(request: Request[Any, Any, Any]) -> AccountView:
        """The customer's account: subscription, license, deployment and instance URLs."""
        return await service().account(sessions.customer(request))

    return [signup, login, me]
