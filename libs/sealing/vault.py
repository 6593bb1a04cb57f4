"""The data keys that seal customers' personal data in events, held outside the log.

Each customer has one data key (AES-256), made at signup. It lives in Postgres, in the schema
``data_keys`` of its own (table ``customer_keys``, made by signup's migration 011), wrapped
(AES-256-GCM) by the platform's master key, which is never stored there: it comes from
``DATA_KEYS_MASTER_KEY`` (``iotistic up`` generates it into its secrets folder). Events carry
``SealedPersonalData``: the personal fields encrypted with the data key, bound by associated
data to the event type and the customer. Erasing a customer destroys their data key (the row
keeps only a tombstone), so every copy of their sealed data, on the log and in its backups,
can no longer be opened: ``open_sealed`` answers ``None`` ("erased") for them.

A process may know several master keys (tests run platforms with keys of their own side by
side; a rotated key must still unwrap what it wrapped): each is registered by its id, and a
wrapped key names the master that wrapped it. The email's subject on the log is a keyed hash
(HMAC-SHA256 with a key derived from the master key), not a plain hash that anyone could
recompute from a guessed address.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass, field

import asyncpg
import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from contracts import CustomerSignedUp, EmailVerified, PersonalData, SealedPersonalData

SCHEMA = "data_keys"
NONCE_BYTES = 12
_personal_decoder = msgspec.json.Decoder(PersonalData)
_encoder = msgspec.json.Encoder()


class SealingError(RuntimeError):
    """Sealed data cannot be opened or made (no master key loaded, no data key, tampered)."""


def _derive(secret: str, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(
        secret.encode()
    )


@dataclass(frozen=True)
class MasterKey:
    """The platform's master key: wraps data keys, and keys the hash of emails' subjects."""

    id: str
    _wrapping: bytes = field(repr=False)
    _subjects: bytes = field(repr=False)

    def email_subject(self, email: str) -> str:
        """The log subject key of an email: a keyed hash, so the subject names no one."""
        digest = hmac.new(self._subjects, email.encode(), hashlib.sha256).hexdigest()
        return digest[:40]

    def wrap(self, customer_id: str, key_id: str, data_key: bytes) -> bytes:
        """``data_key`` encrypted for the vault (nonce + ciphertext)."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        aad = f"data-key:{customer_id}:{key_id}".encode()
        return nonce + AESGCM(self._wrapping).encrypt(nonce, data_key, aad)

    def unwrap(self, customer_id: str, key_id: str, wrapped: bytes) -> bytes:
        """The data key ``wrap`` encrypted; ``SealingError`` if it was tampered with."""
        aad = f"data-key:{customer_id}:{key_id}".encode()
        try:
            return AESGCM(self._wrapping).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], aad)
        except InvalidTag as exc:
            raise SealingError(f"data key {key_id} does not unwrap with master {self.id}") from exc


# The master keys this process has been given, by id (see the module's docstring).
_MASTERS: dict[str, MasterKey] = {}


def master_key(secret: str) -> MasterKey:
    """The master key made from ``secret`` (``DATA_KEYS_MASTER_KEY``), known to this process
    from now on so that ``open_sealed`` can unwrap the data keys it wrapped."""
    if len(secret) < 32:
        raise SealingError("DATA_KEYS_MASTER_KEY must be at least 32 characters")
    wrapping = _derive(secret, b"iotistic data keys: wrapping v1")
    key_id = hashlib.sha256(b"iotistic master key id" + wrapping).hexdigest()[:16]
    key = _MASTERS.get(key_id)
    if key is None:
        key = MasterKey(key_id, wrapping, _derive(secret, b"iotistic email subjects v1"))
        _MASTERS[key_id] = key
    return key


@dataclass(frozen=True)
class DataKey:
    """One customer's data key, unwrapped, for sealing their personal data."""

    customer_id: str
    key_id: str
    key: bytes = field(repr=False)


def _aad(purpose: str, customer_id: str) -> bytes:
    return f"{purpose}:{customer_id}".encode()


def seal(key: DataKey, purpose: str, data: PersonalData) -> SealedPersonalData:
    """``data`` sealed for an event of type ``purpose`` about ``key``'s customer."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = AESGCM(key.key).encrypt(nonce, _encoder.encode(data), _aad(purpose, key.customer_id))
    return SealedPersonalData(key_id=key.key_id, nonce=nonce, ciphertext=sealed)


async def data_key_for(conn: asyncpg.Connection, master: MasterKey, customer_id: str) -> DataKey:
    """The customer's data key, made (and kept, wrapped) on first use. ``SealingError`` when
    the customer's key was destroyed: nothing personal is sealed for an erased customer."""
    fresh = secrets.token_bytes(32)
    new_id = f"dk-{uuid.uuid4().hex[:20]}"
    await conn.execute(
        f"INSERT INTO {SCHEMA}.customer_keys (customer_id, key_id, master_id, wrapped_key) "
        "VALUES ($1, $2, $3, $4) ON CONFLICT (customer_id) DO NOTHING",
        customer_id,
        new_id,
        master.id,
        master.wrap(customer_id, new_id, fresh),
    )
    row = await conn.fetchrow(
        f"SELECT key_id, master_id, wrapped_key FROM {SCHEMA}.customer_keys WHERE customer_id = $1",
        customer_id,
    )
    if row is None or row["wrapped_key"] is None:
        raise SealingError(f"customer {customer_id} is erased: their data key is destroyed")
    return DataKey(customer_id, row["key_id"], _unwrap(customer_id, row))


def _unwrap(customer_id: str, row: asyncpg.Record) -> bytes:
    master = _MASTERS.get(row["master_id"])
    if master is None:
        raise SealingError(
            f"master key {row['master_id']} is not loaded: set DATA_KEYS_MASTER_KEY to the "
            "key the platform was started with"
        )
    return master.unwrap(customer_id, row["key_id"], bytes(row["wrapped_key"]))


async def open_sealed(
    conn: asyncpg.Connection, customer_id: str, purpose: str, sealed: SealedPersonalData
) -> PersonalData | None:
    """The personal data ``sealed`` holds, or ``None`` once the customer is erased (their key
    destroyed). ``SealingError`` for a key that was never made or does not fit: a bug or a
    forgery, which must not pass for an erasure."""
    row = await conn.fetchrow(
        f"SELECT key_id, master_id, wrapped_key FROM {SCHEMA}.customer_keys WHERE customer_id = $1",
        customer_id,
    )
    if row is None or row["key_id"] != sealed.key_id:
        raise SealingError(f"no data key {sealed.key_id} for customer {customer_id}")
    if row["wrapped_key"] is None:
        return None
    key = _unwrap(customer_id, row)
    try:
        plain = AESGCM(key).decrypt(sealed.nonce, sealed.ciphertext, _aad(purpose, customer_id))
    except InvalidTag as exc:
        raise SealingError(f"sealed data of customer {customer_id} does not open") from exc
    return _personal_decoder.decode(plain)


async def destroy_data_key(conn: asyncpg.Connection, customer_id: str) -> str | None:
    """Destroy the customer's data key, keeping a tombstone (its id, when); returns the key's
    id, or None when they never had one. Idempotent: a destroyed key stays destroyed.

    The row's old version lingers in the table's file until vacuumed: ``vacuum_keys`` after
    the transaction commits."""
    return await conn.fetchval(  # type: ignore[no-any-return]
        f"UPDATE {SCHEMA}.customer_keys SET wrapped_key = NULL, "
        "destroyed_at = coalesce(destroyed_at, now()) WHERE customer_id = $1 RETURNING key_id",
        customer_id,
    )


async def vacuum_keys(conn: asyncpg.Connection) -> None:
    """Reclaim the dead row versions that still hold destroyed keys (outside a transaction)."""
    await conn.execute(f"VACUUM {SCHEMA}.customer_keys")


async def personal_data_of(
    conn: asyncpg.Connection, customer_id: str, event: CustomerSignedUp | EmailVerified
) -> PersonalData | None:
    """The personal data an event carries: opened from ``sealed`` (None once the customer is
    erased), or, for an event of the versions before sealing, its plain fields."""
    if event.sealed is not None:
        return await open_sealed(conn, customer_id, event.TYPE, event.sealed)
    if isinstance(event, CustomerSignedUp):
        return PersonalData(
            email=event.email,
            email_display=event.email_display,
            company_name=event.company_name,
            full_name=event.full_name,
        )
    return PersonalData(email=event.email)
