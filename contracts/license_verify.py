"""Verifying licenses with public keys only: what the customer instance imports.

Only RS256 is accepted, from a key the verifier was given (so neither ``alg: none`` nor an HMAC
signed with a public key gets through), and every failure says why.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import jwt
import msgspec
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt import PyJWK

from contracts.license import LicenseClaims

Reason = Literal[
    "malformed", "unknown_kid", "bad_signature", "expired", "wrong_issuer", "bad_claims"
]


Status = Literal["active", "grace", "expired"]


log = logging.getLogger(__name__)


class InvalidLicense(Exception):
    """A license that must not be trusted, and why."""

    def __init__(self, reason: Reason, message: str) -> None:
        """``reason`` is machine-readable; ``message`` is for people."""
        super().__init__(message)
        self.reason: Reason = reason


def _public(key: rsa.RSAPublicKey | rsa.RSAPrivateKey) -> rsa.RSAPublicKey:
    # A member that carries a private half (``d``) is trusted for its public half only.
    return key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key


class LicenseVerifier:
    """Checks license JWTs against a set of public keys (loaded once)."""

    def __init__(
        self,
        keys: Mapping[str, rsa.RSAPublicKey],
        issuer: str = "iotistic-licensing",
        leeway_seconds: int = 0,
    ) -> None:
        """``keys`` maps each ``kid`` to its public key."""
        self._keys = dict(keys)
        self.issuer = issuer
        self.leeway_seconds = leeway_seconds

    @classmethod
    def from_jwks(
        cls, jwks: Mapping[str, Any], issuer: str = "iotistic-licensing", leeway_seconds: int = 0
    ) -> LicenseVerifier:
        """A verifier for every RSA key of a JWK Set (as ``/.well-known/jwks.json`` serves it)."""
        keys: dict[str, rsa.RSAPublicKey] = {}
        for member in jwks.get("keys", []):
            if not (isinstance(member, Mapping) and member.get("kty") == "RSA" and "kid" in member):
                continue
            try:
                # Read as RS256 whatever its ``alg`` says (PyJWKSet would trust that ``alg``).
                key = PyJWK(dict(member), algorithm="RS256").key
            except jwt.PyJWTError as exc:
                # RFC 7517 section 5: a member that cannot be used is ignored (and said).
                log.warning("ignoring JWKS key %r: %s", str(member["kid"])[:64], exc)
                continue
            keys[str(member["kid"])] = _public(key)
        return cls(keys, issuer, leeway_seconds)

    @classmethod
    def from_public_keys(
        cls,
        keys: Mapping[str, rsa.RSAPublicKey],
        issuer: str = "iotistic-licensing",
        leeway_seconds: int = 0,
    ) -> LicenseVerifier:
        """A verifier for the given ``kid`` → public key objects."""
        return cls(keys, issuer, leeway_seconds)

    @property
    def kids(self) -> frozenset[str]:
        """The key ids this verifier trusts."""
        return frozenset(self._keys)

    def verify(self, token: str, now: datetime | None = None) -> LicenseClaims:
        """The license's claims, or ``InvalidLicense`` saying why not (``expired`` once past
        ``exp``, even inside a grace period: use ``status`` to tell the two apart)."""
        claims = self.authentic(token)
        moment = (now or datetime.now(UTC)).timestamp()
        if claims.exp + self.leeway_seconds < moment:
            raise InvalidLicense("expired", f"expired at {claims.expiresAt}")
        return claims

    def status(self, token: str, now: datetime | None = None) -> tuple[LicenseClaims, Status]:
        """The claims of an authentic license and where it stands ``now``: ``active`` before
        ``exp``, ``grace`` until ``graceUntil``, then ``expired`` (the instance goes read-only).
        Raises ``InvalidLicense`` for anything but expiry."""
        claims = self.authentic(token)
        moment = (now or datetime.now(UTC)).timestamp()
        if moment <= claims.exp + self.leeway_seconds:
            return claims, "active"
        if claims.graceUntil is not None:
            try:
                grace = datetime.fromisoformat(claims.graceUntil).timestamp()
            except ValueError:
                raise InvalidLicense("bad_claims", "graceUntil is not a time") from None
            if moment <= grace + self.leeway_seconds:
                return claims, "grace"
        return claims, "expired"

    def authentic(self, token: str) -> LicenseClaims:
        """The claims of a license signed by one of our keys, whatever its times say."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidLicense("malformed", f"not a JWT: {exc}") from None
        if header.get("alg") != "RS256":
            raise InvalidLicense("bad_signature", f"algorithm {header.get('alg')!r} not accepted")
        key = self._keys.get(str(header.get("kid")))
        if key is None:
            raise InvalidLicense("unknown_kid", f"no published key has kid {header.get('kid')!r}")
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=["RS256"],
                options={
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_aud": False,
                    "verify_iss": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise InvalidLicense("bad_signature", "the signature does not match") from None
        except jwt.DecodeError as exc:
            raise InvalidLicense("malformed", f"cannot decode: {exc}") from None
        except jwt.PyJWTError as exc:
            raise InvalidLicense("bad_claims", str(exc)) from None
        try:
            claims = msgspec.convert(payload, LicenseClaims)
        except msgspec.ValidationError as exc:
            raise InvalidLicense("bad_claims", f"claims do not match a license: {exc}") from None
        if claims.iss != self.issuer:
            raise InvalidLicense("wrong_issuer", f"issued by {claims.iss!r}, not {self.issuer!r}")
        return claims
