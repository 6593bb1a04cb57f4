"""Who is calling: the admin (a bearer token) or a customer (a short-lived session token).

Session tokens are HS256 JWTs signed with ``SESSION_SECRET``: signup issues them at login, every
service checks them for the customer's own routes. Admin routes take ``ADMIN_TOKEN``: as a bearer
token, or, for the operators' pages in a browser, as the password of HTTP Basic (any user name).
Both are compared in constant time, and an unset secret closes its routes rather than opening
them.
A session token says nothing of what happened after it was issued: each service that honours
them also refuses those issued before the customer's latest credentials change (``issued_before``
against the cut-off ``CredentialsChanged`` carries) and those of a closed account, from a table
of its own projected from the log.
Instances prove themselves with credentials derived per customer from a secret the provisioner
shares with the service that checks them: usage tokens (billing) and the key that signs the
browser address of a dashboard sign-in (signup).
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import jwt
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from contracts.credentials import login_relay_key

SESSION_AUDIENCE = "iotistic-customer"
SESSION_ISSUER = "iotistic-signup"
_CHALLENGE = {"WWW-Authenticate": "Bearer"}
ADMIN_REALM = {"WWW-Authenticate": 'Basic realm="Iotistic admin", charset="UTF-8"'}


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of a request."""

    kind: Literal["admin", "customer"]
    customer_id: str | None = None

    def may_see(self, customer_id: str) -> bool:
        """Admins see every customer; a customer sees only themselves."""
        return self.kind == "admin" or self.customer_id == customer_id


def bearer(connection: ASGIConnection) -> str | None:  # type: ignore[type-arg]
    """The bearer token of a request, if it has one."""
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


LOGIN_RELAY_HEADER = "Iotistic-Relayed-Client"
LOGIN_RELAY_MAX_AGE_SECONDS = 60
_NONCE = re.compile(r"^[0-9a-f]{32}$")
_SIGNATURE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class RelayedClient:
    """A browser address an instance vouched for, for one sign-in."""

    customer_id: str
    address: str
    nonce: str


def _relay_signature(
    key: str, customer_id: str, address: str, issued_at: int, nonce: str, email: str
) -> str:
    message = "\n".join(("login-relay/v1", customer_id, address, str(issued_at), nonce, email))
    return hmac.new(key.encode(), message.encode(), "sha256").hexdigest()


def relayed_client_header(
    key: str, customer_id: str, address: str, email: str, now: float | None = None
) -> str:
    """The ``Iotistic-Relayed-Client`` value an instance sends with a sign-in it relays: the
    browser's address, when, a nonce, and an HMAC over them and the email signing in."""
    issued = int(time.time() if now is None else now)
    nonce = secrets.token_hex(16)
    signature = _relay_signature(key, customer_id, address, issued, nonce, email)
    return f"instance={customer_id}; address={address}; ts={issued}; nonce={nonce}; sig={signature}"


def verify_relayed_client(
    header: str | None, login_relay_secret: str | None, email: str, now: float | None = None
) -> RelayedClient | None:
    """The address a relayed sign-in's header vouches for, or None when the header is absent,
    malformed, older (or newer) than a minute, or not signed with the named instance's key
    over this email. Whether its nonce was seen before is the caller's to check."""
    if not header or not login_relay_secret or len(header) > 512:
        return None
    fields: dict[str, str] = {}
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        fields[name] = value
    customer_id, address = fields.get("instance", ""), fields.get("address", "")
    nonce, signature, issued = fields.get("nonce", ""), fields.get("sig", ""), fields.get("ts", "")
    if not (customer_id and _NONCE.match(nonce) and _SIGNATURE.match(signature)):
        return None
    if not issued.isdigit() or len(issued) > 12:
        return None
    current = time.time() if now is None else now
    if abs(current - int(issued)) > LOGIN_RELAY_MAX_AGE_SECONDS:
        return None
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return None
    key = login_relay_key(login_relay_secret, customer_id)
    expected = _relay_signature(key, customer_id, address, int(issued), nonce, email)
    if not hmac.compare_digest(expected, signature):
        return None
    return RelayedClient(customer_id=customer_id, address=address, nonce=nonce)


def is_admin(token: str | None, admin_token: str | None) -> bool:
    """True when ``token`` is the configured admin token."""
    if not token or not admin_token:
        return False
    return hmac.compare_digest(token.encode(), admin_token.encode())


def admin_guard(admin_token: str | None) -> Guard:
    """A litestar guard that lets a request through only with ``Bearer <admin_token>``."""

    def guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:  # type: ignore[type-arg]
        if not admin_token:
            raise PermissionDeniedException("admin routes are disabled: ADMIN_TOKEN is not set")
        if not is_admin(bearer(connection), admin_token):
            raise NotAuthorizedException("admin credential required", headers=_CHALLENGE)

    return guard


def basic_password(connection: ASGIConnection) -> str | None:  # type: ignore[type-arg]
    """The password of a request's HTTP Basic credentials, if it has some (the user name is
    not read). Hand-written: litestar has no HTTP Basic authentication of its own."""
    scheme, _, value = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError
        return None
    _, _, password = decoded.partition(":")
    return password or None


def admin_page_guard(admin_token: str | None) -> Guard:
    """A guard for operators' pages: the admin token as the password of HTTP Basic (so a
    browser asks for it, and ``ADMIN_REALM`` challenges it) or as a bearer token."""

    def guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:  # type: ignore[type-arg]
        if not admin_token:
            raise PermissionDeniedException("admin routes are disabled: ADMIN_TOKEN is not set")
        token = bearer(connection) or basic_password(connection)
        if not is_admin(token, admin_token):
            raise NotAuthorizedException("admin credential required", headers=ADMIN_REALM)

    return guard


class SessionTokens:
    """Issues and checks customers' session tokens."""

    def __init__(self, secret: str | None, ttl_seconds: int = 3600) -> None:
        """``secret`` None means customer sessions are switched off (every check fails)."""
        self._secret = secret
        self.ttl_seconds = ttl_seconds

    def issue(self, customer_id: str, email: str, now: float | None = None) -> str:
        """A session token for the customer, valid for ``ttl_seconds``."""
        if not self._secret:
            raise PermissionDeniedException("customer sessions are disabled: SESSION_SECRET unset")
        issued = int(now if now is not None else time.time())
        claims = {
            "sub": customer_id,
            "email": email,
            "iat": issued,
            "exp": issued + self.ttl_seconds,
            "iss": SESSION_ISSUER,
            "aud": SESSION_AUDIENCE,
            "jti": secrets.token_urlsafe(12),
        }
        return jwt.encode(claims, self._secret, algorithm="HS256")

    def customer_of(self, token: str | None) -> str | None:
        """The customer id a valid session token names, else None."""
        if not token or not self._secret:
            return None
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                audience=SESSION_AUDIENCE,
                issuer=SESSION_ISSUER,
                options={"require": ["sub", "exp", "iat"]},
            )
        except jwt.PyJWTError:
            return None
        subject = claims.get("sub")
        return subject if isinstance(subject, str) else None

    def customer(self, connection: ASGIConnection) -> str:  # type: ignore[type-arg]
        """The customer whose valid session token the request carries; 401 otherwise."""
        customer_id = self.customer_of(bearer(connection))
        if customer_id is None:
            raise session_refused()
        return customer_id

    def caller(self, connection: ASGIConnection, admin_token: str | None) -> Caller:  # type: ignore[type-arg]
        """The admin or the customer making the request; 401 for anyone else."""
        token = bearer(connection)
        if is_admin(token, admin_token):
            return Caller(kind="admin")
        customer_id = self.customer_of(token)
        if customer_id is None:
            raise session_refused()
        return Caller(kind="customer", customer_id=customer_id)


def session_refused() -> NotAuthorizedException:
    """The 401 for a session that does not hold, whatever the reason (expired, forged, issued
    before a password reset, of a closed account): the caller learns only to sign in again."""
    return NotAuthorizedException("a valid session token is required", headers=_CHALLENGE)


def session_issued_at(token: str) -> int | None:
    """The ``iat`` of a session token whose signature the caller has already checked."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    value = claims.get("iat")
    return int(value) if isinstance(value, int | float) else None


def issued_before(token: str, cutoff: datetime | None) -> bool:
    """Whether a session token (signature already checked) was issued before ``cutoff``, the
    time from which the customer's sessions hold (``CredentialsChanged.sessions_valid_from``):
    such a token is refused. A token without an ``iat`` counts as issued before any cut-off;
    no cut-off (None) refuses nothing."""
    if cutoff is None:
        return False
    iat = session_issued_at(token)
    return iat is None or iat < cutoff.timestamp()
