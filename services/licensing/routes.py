"""Licensing's HTTP API: the JWKS, a customer's license and its history, verification."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.params import FromPath, JSONBody
from litestar.types import ControllerRouterHandler

from contracts.license_verify import InvalidLicense, LicenseVerifier
from libs.http.auth import SessionTokens
from libs.http.errors import InvalidRequest, NotFound
from libs.runtime.service import ServiceRuntime
from services.licensing.keys import KeyRing
from services.licensing.settings import LicensingSettings

BODY_LIMIT = 64 * 1024


class VerifyRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    token: str


def _license(row: Any, now: datetime) -> dict[str, Any]:
    expires = row["expires_at"]
    grace = row["grace_until"]
    status = (
        "revoked"
        if row["revoked_at"]
        else "active"
        if expires > now
        else ("grace" if grace is not None and grace > now else "expired")
    )
    return {
        "license_id": row["license_id"],
        "customer_id": row["customer_id"],
        "plan": row["plan"],
        "status": status,
        "license_type": row["license_type"],
        "kid": row["kid"],
        "issued_at": row["issued_at"],
        "expires_at": expires,
        "grace_until": grace,
        "features": msgspec.json.decode(row["features"]),
        "limits": msgspec.json.decode(row["limits"]),
        "jwt": row["jwt"],
    }


def licensing_routes(runtime: ServiceRuntime, keyring: KeyRing) -> list[ControllerRouterHandler]:
    """JWKS, ``/api/licenses/{customer_id}``, its history, and ``/api/licenses/verify``."""
    settings = runtime.settings_as(LicensingSettings)
    sessions = SessionTokens(settings.session_secret, settings.session_ttl_seconds)
    jwks = keyring.jwks()
    verifier = LicenseVerifier.from_jwks(jwks, issuer=settings.license_issuer)

    @get("/.well-known/jwks.json", tags=["licenses"], cache=300)
    async def published_keys() -> dict[str, Any]:
        """Every public key licenses may be signed with (old ones stay until they expire)."""
        return jwks

    @get("/api/licenses/{customer_id:str}", tags=["licenses"])
    async def current_license(customer_id: FromPath[str], request: Request[Any, Any, Any]) -> Any:
        """The customer's newest license (that customer or an admin)."""
        caller = sessions.caller(request, settings.admin_token)
        if not caller.may_see(customer_id):
            raise NotFound("no license for this customer")
        row = await runtime.db().fetchrow(
            "SELECT * FROM licenses WHERE customer_id = $1 AND revoked_at IS NULL "
            "ORDER BY issued_at DESC, license_id LIMIT 1",
            customer_id,
        )
        if row is None:
            raise NotFound("no license for this customer")
        return _license(row, datetime.now(UTC))

    @get("/api/licenses/{customer_id:str}/history", tags=["licenses"])
    async def license_history(
        customer_id: FromPath[str], request: Request[Any, Any, Any]
    ) -> dict[str, Any]:
        """Every license issued or revoked for the customer, oldest first, with who and why."""
        caller = sessions.caller(request, settings.admin_token)
        if not caller.may_see(customer_id):
            raise NotFound("no license for this customer")
        rows = await runtime.db().fetch(
            "SELECT * FROM license_history WHERE customer_id = $1 ORDER BY seq", customer_id
        )
        return {
            "customer_id": customer_id,
            "history": [
                {
                    k: r[k]
                    for k in (
                        "license_id",
                        "action",
                        "license_type",
                        "plan",
                        "actor",
                        "reason",
                        "at",
                    )
                }
                for r in rows
            ],
        }

    @post(
        "/api/licenses/verify", status_code=200, tags=["licenses"], request_max_body_size=BODY_LIMIT
    )
    async def verify(data: JSONBody[dict[str, Any]]) -> Response[Any]:
        """The claims of a valid license, or why it is not valid."""
        token = data.get("token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise InvalidRequest(
                "invalid request",
                fields=[{"field": "token", "reason": "is required (the license JWT)"}],
            )
        try:
            claims = verifier.verify(token)
        except InvalidLicense as exc:
            return Response({"valid": False, "reason": exc.reason, "message": str(exc)})
        return Response({"valid": True, "claims": msgspec.to_builtins(claims)})

    return [published_keys, current_license, license_history, verify]
