"""Licensing's HTTP API: the JWKS, a customer's license and its history, verification.

Thin translations: each handler reads what the request says and hands it to ``license_views``
or the verifier. What they need comes in as litestar dependencies, made once per process from
the service's runtime and its key ring (``licensing_routes``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
from litestar import Controller, Request, Router, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody
from litestar.types import ControllerRouterHandler

from contracts.license_verify import InvalidLicense, LicenseVerifier
from libs.http.auth import Caller, SessionTokens
from libs.http.errors import NotFound
from libs.http.validation import FieldErrors
from libs.runtime.service import ServiceRuntime
from services.licensing.access import CustomerSessions
from services.licensing.keys import KeyRing
from services.licensing.license_views import is_revoked, license_history, newest_license
from services.licensing.settings import LicensingSettings

BODY_LIMIT = 64 * 1024


def license_token(body: dict[str, Any]) -> str:
    """The license JWT a verify request names (a 400 on ``token`` when there is none)."""
    errors = FieldErrors()
    token = body.get("token")
    if not isinstance(token, str) or not token:
        errors.add("token", "is required (the license JWT)")
        token = ""
    errors.raise_if_any()
    return token


class PublishedKeysController(Controller):
    """The public keys licenses are signed with, for instances and anyone verifying."""

    path = "/.well-known"
    tags = ("licenses",)

    @get("/jwks.json", cache=300)
    async def published_keys(self, jwks: NamedDependency[dict[str, Any]]) -> dict[str, Any]:
        """Every public key licenses may be signed with (old ones stay until they expire)."""
        return jwks


class LicenseController(Controller):
    """A customer's licenses (that customer or an admin), and verification for anyone."""

    path = "/api/licenses"
    tags = ("licenses",)

    @get("/{customer_id:str}")
    async def current_license(
        self,
        customer_id: FromPath[str],
        caller: NamedDependency[Caller],
        pool: NamedDependency[asyncpg.Pool],
    ) -> dict[str, Any]:
        """The customer's newest license (that customer or an admin)."""
        if not caller.may_see(customer_id):
            raise NotFound("no license for this customer")
        found = await newest_license(pool, customer_id, datetime.now(UTC))
        if found is None:
            raise NotFound("no license for this customer")
        return found

    @get("/{customer_id:str}/history")
    async def history(
        self,
        customer_id: FromPath[str],
        caller: NamedDependency[Caller],
        pool: NamedDependency[asyncpg.Pool],
    ) -> dict[str, Any]:
        """Every license issued or revoked for the customer, oldest first, with who and why."""
        if not caller.may_see(customer_id):
            raise NotFound("no license for this customer")
        return {"customer_id": customer_id, "history": await license_history(pool, customer_id)}

    @post("/verify", status_code=200, request_max_body_size=BODY_LIMIT)
    async def verify(
        self,
        data: JSONBody[dict[str, Any]],
        verifier: NamedDependency[LicenseVerifier],
        pool: NamedDependency[asyncpg.Pool],
    ) -> dict[str, Any]:
        """The claims of a valid license, or why it is not valid (``revoked``: its account
        was closed, though the signature and times still hold)."""
        try:
            claims = verifier.verify(license_token(data))
        except InvalidLicense as exc:
            return {"valid": False, "reason": exc.reason, "message": str(exc)}
        if await is_revoked(pool, claims.licenseId):
            return {"valid": False, "reason": "revoked", "message": "the license was revoked"}
        return {"valid": True, "claims": msgspec.to_builtins(claims)}


def licensing_routes(runtime: ServiceRuntime, keyring: KeyRing) -> list[ControllerRouterHandler]:
    """JWKS, ``/api/licenses/{customer_id}``, its history, and ``/api/licenses/verify``."""
    settings = runtime.settings_as(LicensingSettings)
    jwks = keyring.jwks()
    verifier = LicenseVerifier.from_jwks(jwks, issuer=settings.license_issuer)

    def pool() -> asyncpg.Pool:
        # A function, not the bound runtime.db: litestar deep-copies a nested router's
        # dependencies, and a bound method would copy the runtime (and its locks) with it.
        return runtime.db()

    # Valid and still holding: not from before a password reset, nor of a closed account.
    sessions = CustomerSessions(
        SessionTokens(settings.session_secret, settings.session_ttl_seconds), pool
    )

    async def caller(request: Request[Any, Any, Any]) -> Caller:
        return await sessions.caller(request, settings.admin_token)

    dependencies = {
        "caller": Provide(caller),
        "jwks": Provide(lambda: jwks, sync_to_thread=False),
        "pool": Provide(pool, sync_to_thread=False),
        "verifier": Provide(lambda: verifier, sync_to_thread=False),
    }
    return [
        Router(
            "/",
            route_handlers=[PublishedKeysController, LicenseController],
            dependencies=dependencies,
        )
    ]
