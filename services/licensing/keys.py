"""License signing keys: RS256 keys in a folder, the newest signs, all are published.

A key is a PKCS#8 PEM file named by its creation time (``20261124T180000000000Z.pem``); its
``kid`` is its RFC 7638 JWK thumbprint. Retired keys whose private half was removed can stay as
``<name>.pub.pem``: published in the JWKS, so the licenses they signed keep verifying, never
used to sign. Key objects are loaded once: handing a JWT library a PEM string re-parses and
re-checks the key on every call (about 25 ms for a 4096-bit key).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from jwt.utils import base64url_encode

MIN_BITS = 2048
_STAMP = "%Y%m%dT%H%M%S%fZ"


class KeyConfigError(ValueError):
    """The signing keys are missing, unreadable, too weak or too exposed."""


def public_jwk(public_key: rsa.RSAPublicKey) -> dict[str, str]:
    """The key's public half as a JWK (kty, n, e), encoded by pyjwt."""
    jwk = RSAAlgorithm.to_jwk(public_key, as_dict=True)
    # Without the key_ops pyjwt adds: the JWKS stays byte for byte what instances have cached.
    return {"kty": jwk["kty"], "n": jwk["n"], "e": jwk["e"]}


def thumbprint(public_key: rsa.RSAPublicKey) -> str:
    """RFC 7638 JWK thumbprint: the key's ``kid``."""
    # By hand: pyjwt (2.15) has no RFC 7638 thumbprint; its JWK supplies the members hashed.
    jwk = public_jwk(public_key)
    canonical = json.dumps({"e": jwk["e"], "kty": "RSA", "n": jwk["n"]}, separators=(",", ":"))
    return base64url_encode(hashlib.sha256(canonical.encode()).digest()).decode()


@dataclass(frozen=True)
class SigningKey:
    """One key: its id, when it was made, and its key objects (private None when retired)."""

    kid: str
    created: datetime
    public_key: rsa.RSAPublicKey
    private_key: rsa.RSAPrivateKey | None = field(default=None, repr=False)


@dataclass(frozen=True)
class KeyRing:
    """Every key, oldest first; the newest key with a private half signs."""

    keys: tuple[SigningKey, ...]

    @property
    def current(self) -> SigningKey:
        """The key new licenses are signed with."""
        for key in reversed(self.keys):
            if key.private_key is not None:
                return key
        raise KeyConfigError("no license signing key (only retired public keys)")

    def by_kid(self, kid: str) -> SigningKey | None:
        """The key with that id, if any."""
        return next((k for k in self.keys if k.kid == kid), None)

    def jwks(self) -> dict[str, Any]:
        """All public keys as a JWK Set, newest first."""
        return {
            "keys": [
                {**public_jwk(k.public_key), "kid": k.kid, "use": "sig", "alg": "RS256"}
                for k in reversed(self.keys)
            ]
        }


def generate_key(directory: Path, bits: int = 4096) -> Path:
    """Make a new signing key in ``directory`` (0700), written 0600 atomically. Slow: 4096 bits."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = directory / f"{datetime.now(UTC).strftime(_STAMP)}.pem"
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".new-", suffix=".pem")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def _created(path: Path) -> datetime:
    stem = path.name.split(".", 1)[0]
    try:
        return datetime.strptime(stem, _STAMP).replace(tzinfo=UTC)
    except ValueError:
        return datetime.fromtimestamp(path.stat().st_mtime, UTC)


def _private_key(data: bytes, source: str) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyConfigError(f"{source} is not a readable unencrypted PEM private key") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyConfigError(f"{source} is not an RSA key (licenses are signed RS256)")
    if key.key_size < MIN_BITS:
        raise KeyConfigError(f"{source} has {key.key_size} bits; at least {MIN_BITS} are needed")
    return key


def _load_file(path: Path) -> SigningKey:
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO) and not path.name.endswith(".pub.pem"):
        raise KeyConfigError(f"{path} is readable by others: chmod 600 {path}")
    data = path.read_bytes()
    if path.name.endswith(".pub.pem"):
        try:
            public = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise KeyConfigError(f"{path} is not a readable PEM public key") from exc
        if not isinstance(public, rsa.RSAPublicKey):
            raise KeyConfigError(f"{path} is not an RSA public key")
        return SigningKey(kid=thumbprint(public), created=_created(path), public_key=public)
    private = _private_key(data, str(path))
    public = private.public_key()
    return SigningKey(
        kid=thumbprint(public), created=_created(path), public_key=public, private_key=private
    )


def load_keyring(directory: Path | None = None, private_key_pem: str | None = None) -> KeyRing:
    """Keys from a folder and/or one PEM from the environment (that one is the newest)."""
    keys: list[SigningKey] = []
    if directory is not None:
        if not directory.is_dir():
            raise KeyConfigError(f"LICENSE_KEYS_DIR {directory} is not a folder")
        keys += [_load_file(p) for p in sorted(directory.glob("*.pem")) if p.is_file()]
    if private_key_pem:
        private = _private_key(private_key_pem.encode(), "LICENSE_PRIVATE_KEY")
        keys.append(
            SigningKey(
                kid=thumbprint(private.public_key()),
                created=datetime.max.replace(tzinfo=UTC),
                public_key=private.public_key(),
                private_key=private,
            )
        )
    keys.sort(key=lambda k: k.created)
    unique = {k.kid: k for k in keys}  # the same key twice counts once (the later entry)
    ring = KeyRing(tuple(sorted(unique.values(), key=lambda k: k.created)))
    if not ring.keys:
        raise KeyConfigError(
            "no license signing key: set LICENSE_KEYS_DIR (a folder of PEM keys) or "
            "LICENSE_PRIVATE_KEY"
        )
    ring.current  # noqa: B018 - raises when there are only retired keys
    return ring


def ensure_keyring(directory: Path, bits: int = 4096) -> KeyRing:
    """The keys in ``directory``, after making a first one if there is none (embedded default)."""
    if not directory.is_dir() or not any(
        p for p in directory.glob("*.pem") if not p.name.endswith(".pub.pem")
    ):
        generate_key(directory, bits)
    return load_keyring(directory)
