"""Credentials a customer's instance holds, derived per customer from a secret two services share.

The provisioner hands each instance its credentials; the service that checks them derives the
same value from the same secret, so nothing needs storing and a credential is useless for any
other customer or purpose. Both sides agree on the derivation here.
"""

from __future__ import annotations

import hmac


def derived_secret(secret: bytes, purpose: str, subject: str) -> str:
    """A secret for ``purpose`` and ``subject`` (a customer), derived with HMAC-SHA256 from
    ``secret``: the same every time, so it needs no storing, and useless for any other pair."""
    return hmac.new(secret, f"{purpose}:{subject}".encode(), "sha256").hexdigest()


def instance_usage_token(usage_secret: str, customer_id: str) -> str:
    """The token a customer's instance reports its usage to billing with (``USAGE_SECRET``)."""
    return derived_secret(usage_secret.encode(), "usage", customer_id)


def login_relay_key(login_relay_secret: str, customer_id: str) -> str:
    """The key a customer's instance signs its browsers' addresses with, when its dashboard
    relays a sign-in to the control plane (derived from ``LOGIN_RELAY_SECRET``)."""
    return derived_secret(login_relay_secret.encode(), "login-relay", customer_id)
