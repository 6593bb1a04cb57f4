"""License keys, signing and verification, and the JWKS that lets keys rotate."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt as jose_jwt
from joserfc.errors import BadSignatureError
from joserfc.jwk import KeySet, RSAKey

from contracts.license_verify import InvalidLicense, LicenseVerifier
from services.licensing.issuing import LicenseSigner, build_claims
from services.licensing.keys import (
    KeyConfigError,
    ensure_keyring,
    generate_key,
    load_keyring,
    thumbprint,
)
from services.licensing.plans import plan

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@cache
def _pem(bits: int = 2048) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def claims(days: int = 14, issuer: str = "iotistic-licensing"):  # type: ignore[no-untyped-def]
    return build_claims(
        customer_id="c-1",
        license_id=str(uuid.uuid4()),
        plan=plan("starter"),
        license_type="trial_signup",
        issued_at=NOW,
        expires_at=NOW + timedelta(days=days),
        grace_until=None,
        issuer=issuer,
    )


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "keys"
    generate_key(folder, bits=2048)
    return folder


def test_sign_and_verify_round_trip_with_kid_and_jwks(keys_dir: Path) -> None:
    ring = load_keyring(keys_dir)
    signer = LicenseSigner(ring)
    original = claims()
    token = signer.sign(original)
    assert pyjwt.get_unverified_header(token)["kid"] == ring.current.kid
    assert ring.current.kid == thumbprint(ring.current.public_key)
    jwks = ring.jwks()
    assert [k["kid"] for k in jwks["keys"]] == [ring.current.kid]
    assert LicenseVerifier.from_jwks(jwks).verify(token, now=NOW) == original
    assert isinstance(ring.current.private_key, rsa.RSAPrivateKey)  # an object, not a PEM


def test_another_jwt_library_accepts_the_license_and_rejects_a_tampered_one(keys_dir) -> None:
    ring = load_keyring(keys_dir)
    token = LicenseSigner(ring).sign(claims())
    key_set = KeySet.import_key_set(ring.jwks())
    decoded = jose_jwt.decode(token, key_set, algorithms=["RS256"])
    assert decoded.claims["customerId"] == "c-1"
    header, payload, signature = token.split(".")
    middle = len(signature) // 2
    swapped = "A" if signature[middle] != "A" else "B"
    tampered = f"{header}.{payload}.{signature[:middle]}{swapped}{signature[middle + 1 :]}"
    with pytest.raises(BadSignatureError):
        jose_jwt.decode(tampered, key_set, algorithms=["RS256"])


def _flip(part: str) -> str:
    middle = len(part) // 2
    return part[:middle] + ("A" if part[middle] != "A" else "B") + part[middle + 1 :]


def test_what_the_verifier_rejects_and_why(keys_dir: Path, tmp_path: Path) -> None:
    ring = load_keyring(keys_dir)
    verifier = LicenseVerifier.from_jwks(ring.jwks())
    token = LicenseSigner(ring).sign(claims())
    header, payload, signature = token.split(".")

    def reason(candidate: str, now: datetime = NOW) -> str:
        with pytest.raises(InvalidLicense) as caught:
            verifier.verify(candidate, now=now)
        return caught.value.reason

    assert reason(f"{header}.{payload}.{_flip(signature)}") == "bad_signature"
    assert reason(f"{header}.{_flip(payload)}.{signature}") in {"bad_signature", "malformed"}
    assert reason(token, now=NOW + timedelta(days=15)) == "expired"
    assert reason("not a token") == "malformed"

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    body = pyjwt.decode(token, options={"verify_signature": False})
    forged_same_kid = pyjwt.encode(
        body, other, algorithm="RS256", headers={"kid": ring.current.kid}
    )
    assert reason(forged_same_kid) == "bad_signature"
    forged_own_kid = pyjwt.encode(
        body, other, algorithm="RS256", headers={"kid": thumbprint(other.public_key())}
    )
    assert reason(forged_own_kid) == "unknown_kid"
    unsigned = pyjwt.encode(body, None, algorithm="none", headers={"kid": ring.current.kid})
    assert reason(unsigned) == "bad_signature"
    # Algorithm confusion: an HS256 header over the same body must not pass as a license.
    hs_header = pyjwt.utils.base64url_encode(
        json.dumps({"alg": "HS256", "kid": ring.current.kid}).encode()
    ).decode()
    assert reason(f"{hs_header}.{payload}.{signature}") == "bad_signature"
    wrong_issuer = LicenseSigner(ring).sign(claims(issuer="someone-else"))
    assert reason(wrong_issuer) == "wrong_issuer"


def test_a_new_key_signs_and_licenses_of_the_old_key_keep_verifying(keys_dir: Path) -> None:
    old_ring = load_keyring(keys_dir)
    old_token = LicenseSigner(old_ring).sign(claims())
    generate_key(keys_dir, bits=2048)
    ring = load_keyring(keys_dir)
    assert len(ring.keys) == 2
    assert ring.current.kid != old_ring.current.kid
    new_token = LicenseSigner(ring).sign(claims())
    assert pyjwt.get_unverified_header(new_token)["kid"] == ring.current.kid
    jwks = ring.jwks()
    assert [k["kid"] for k in jwks["keys"]] == [ring.current.kid, old_ring.current.kid]
    verifier = LicenseVerifier.from_jwks(jwks)
    assert verifier.verify(old_token, now=NOW).customerId == "c-1"
    assert verifier.verify(new_token, now=NOW).customerId == "c-1"


def test_a_retired_public_key_is_published_but_never_signs(keys_dir: Path) -> None:
    old = load_keyring(keys_dir)
    old_token = LicenseSigner(old).sign(claims())
    [pem] = keys_dir.glob("*.pem")
    private = serialization.load_pem_private_key(pem.read_bytes(), password=None)
    public = private.public_key().public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    retired = keys_dir / pem.name.replace(".pem", ".pub.pem")
    retired.write_bytes(public)
    pem.unlink()
    generate_key(keys_dir, bits=2048)
    ring = load_keyring(keys_dir)
    assert ring.current.kid != old.current.kid
    assert old.current.kid in {k["kid"] for k in ring.jwks()["keys"]}
    assert LicenseVerifier.from_jwks(ring.jwks()).verify(old_token, now=NOW).sub == "c-1"


def test_key_files_are_private_and_bad_ones_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "k"
    path = generate_key(folder, bits=2048)
    assert os.stat(folder).st_mode & 0o777 == 0o700
    assert os.stat(path).st_mode & 0o777 == 0o600
    path.chmod(0o644)
    with pytest.raises(KeyConfigError, match="chmod 600") as caught:
        load_keyring(folder)
    assert "BEGIN" not in str(caught.value)
    path.chmod(0o600)
    (folder / "junk.pem").write_text("not a key")
    (folder / "junk.pem").chmod(0o600)
    with pytest.raises(KeyConfigError, match=r"junk\.pem"):
        load_keyring(folder)
    (folder / "junk.pem").unlink()
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (folder / "ec.pem").write_bytes(ec_key)
    (folder / "ec.pem").chmod(0o600)
    with pytest.raises(KeyConfigError, match="not an RSA key"):
        load_keyring(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KeyConfigError, match="no license signing key"):
        load_keyring(empty)


def test_a_key_from_the_environment_signs(tmp_path: Path) -> None:
    ring = load_keyring(None, _pem().decode())
    token = LicenseSigner(ring).sign(claims())
    assert LicenseVerifier.from_jwks(ring.jwks()).verify(token, now=NOW).plan == "starter"
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - refused
    small = weak.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(KeyConfigError, match="at least 2048"):
        load_keyring(None, small.decode())


def test_the_embedded_default_makes_one_4096_bit_key_at_first_start(tmp_path: Path) -> None:
    ring = ensure_keyring(tmp_path / "fresh")
    assert ring.current.public_key.key_size == 4096
    again = ensure_keyring(tmp_path / "fresh")
    assert [k.kid for k in again.keys] == [ring.current.kid]


# A public key fixed once, and its kid and JWKS as the hand-written encoder (before pyjwt's
# PyJWK and to_jwk took it over) produced them: licenses already issued name this kid, and the
# instances cache this JWKS, so neither may change by a byte.
FIXED_PUBLIC_PEM = b"""-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAsffkDN5d7qEQ9RmoTtLk
AOM6FSfTpcvyc3NlvwuUlPVeFMhfNWmTw3gHRIa3esGB4oqL47itcUf/pytQPyIR
fDWaebQrQOmFItzn64hGq5B1L2bx7rtrHnOziPwNZ+V7GkgGqQySCm57PwUAieVq
+EOoJ66HscOC95lsvw0WLPs0dmuRELPMhygGFvwn1/YO5DLAI8tMOLOPjjLk8obt
I2RkMLBYww9ETYdEn/fISgAwdnKE3uKETd58P0XzFmsx8YHuVCqntIBKNkRdTpBq
KoivsoEynD8/xMqakENQF39VlVurRM51kc25BgOPLkor4t3M56AEMGYtEMiIFIeg
pQIDAQAB
-----END PUBLIC KEY-----
"""
FIXED_KID = "TtUCKwZbugsAZhnSo26O85SxFIzc8oFA1kKsGWWLnco"
FIXED_JWKS_ENTRY = (
    '{"kty":"RSA","n":"sffkDN5d7qEQ9RmoTtLkAOM6FSfTpcvyc3NlvwuUlPVeFMhfNWmTw3gHRIa3esGB4oqL47itcU'
    "f_pytQPyIRfDWaebQrQOmFItzn64hGq5B1L2bx7rtrHnOziPwNZ-V7GkgGqQySCm57PwUAieVq-EOoJ66HscOC95lsvw"
    "0WLPs0dmuRELPMhygGFvwn1_YO5DLAI8tMOLOPjjLk8obtI2RkMLBYww9ETYdEn_fISgAwdnKE3uKETd58P0XzFmsx8Y"
    "HuVCqntIBKNkRdTpBqKoivsoEynD8_xMqakENQF39VlVurRM51kc25BgOPLkor4t3M56AEMGYtEMiIFIegpQ"
    '","e":"AQAB","kid":"TtUCKwZbugsAZhnSo26O85SxFIzc8oFA1kKsGWWLnco","use":"sig","alg":"RS256"}'
)


def test_a_fixed_key_keeps_its_kid_and_its_jwks_byte_for_byte(tmp_path: Path) -> None:
    public = serialization.load_pem_public_key(FIXED_PUBLIC_PEM)
    assert isinstance(public, rsa.RSAPublicKey)
    assert thumbprint(public) == FIXED_KID
    assert RSAKey.import_key(FIXED_PUBLIC_PEM).thumbprint() == FIXED_KID  # another library agrees
    # Loaded the way a retired key is (a .pub.pem next to the key that signs), and served.
    folder = tmp_path / "keys"
    generate_key(folder, bits=2048)
    (folder / "20200101T000000000000Z.pub.pem").write_bytes(FIXED_PUBLIC_PEM)
    jwks = load_keyring(folder).jwks()
    assert len(jwks["keys"]) == 2
    assert json.dumps(jwks["keys"][-1], separators=(",", ":")) == FIXED_JWKS_ENTRY
    verifier = LicenseVerifier.from_jwks({"keys": [json.loads(FIXED_JWKS_ENTRY)]})
    assert verifier.kids == {FIXED_KID}


def test_jwks_members_that_cannot_verify_a_license_are_ignored(keys_dir: Path) -> None:
    ring = load_keyring(keys_dir)
    token = LicenseSigner(ring).sign(claims())
    [good] = ring.jwks()["keys"]
    jwks = {
        "keys": [
            {**good, "kid": "says-none", "alg": "none"},  # read as RS256 all the same
            {"kty": "RSA", "kid": "garbled", "n": "!!", "e": "AQAB"},
            {"kty": "EC", "kid": "ec", "crv": "P-256", "x": "AA", "y": "AA"},
            {"kty": "RSA", "n": good["n"], "e": good["e"]},  # no kid
            "not a key",
            good,
        ]
    }
    verifier = LicenseVerifier.from_jwks(jwks)
    assert verifier.kids == {"says-none", ring.current.kid}
    assert verifier.verify(token, now=NOW).customerId == "c-1"
    assert LicenseVerifier.from_jwks({"keys": []}).kids == frozenset()
