"""Signing webhook payloads exactly as Stripe does, for the tests of the webhook gateway."""

from __future__ import annotations

import hashlib
import hmac
import time

SECRET = "whsec_" + "t3st" * 8


def sign(payload: bytes, secret: str = SECRET, at: int | None = None) -> str:
    """A Stripe-Signature header: t=<unix time>,v1=HMAC-SHA256(secret, "<t>.<payload>")."""
    timestamp = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"
