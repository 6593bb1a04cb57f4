"""Who may use this instance: its customer, signed in on the control plane.

A request carries the customer's session token (from ``POST /api/customers/login``). The
instance holds no secret that could mint one: it asks the control plane whose token it is
(``GET /api/customers/me``) and accepts it only for its own customer. Answers are cached for a
minute (a refused one for ten seconds) by the token's hash, so the control plane is asked once
per session and minute, not per request.
"""

from __future__ import annotations

import hashlib
import time
from typing import Literal

import httpx

from libs.observability.telemetry import traced_hooks

Caller = Literal["customer", "other", "nobody"]
ACCEPTED_FOR = 60.0
REFUSED_FOR = 10.0


class ControlPlaneUnavailable(Exception):
    """The control plane did not answer; the request should be tried again."""


class CustomerSessions:
    """Checks session tokens with the control plane, for one customer."""

    def __init__(self, control_plane_url: str, customer_id: str) -> None:
        """``customer_id`` is the only customer this instance accepts."""
        self._url = control_plane_url.rstrip("/")
        self._customer = customer_id
        self._cache: dict[str, tuple[float, Caller]] = {}

    async def caller(self, token: str | None) -> Caller:
        """``customer`` for a session of this instance's customer, ``other`` for another
        customer's, ``nobody`` without a valid one."""
        if not token or not (token.isascii() and token.isprintable()):
            return "nobody"  # no token of ours is anything else, and no header could carry it on
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            async with httpx.AsyncClient(timeout=5, event_hooks=traced_hooks()) as client:
                answer = await client.get(
                    f"{self._url}/api/customers/me", headers={"Authorization": f"Bearer {token}"}
                )
        except httpx.HTTPError:
            raise ControlPlaneUnavailable("the control plane did not answer") from None
        if answer.status_code >= 500:
            raise ControlPlaneUnavailable(f"the control plane answered {answer.status_code}")
        who: Caller = "nobody"
        if answer.status_code == 200:
            owner = answer.json().get("customer", {}).get("customer_id")
            who = "customer" if owner == self._customer else "other"
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (now + (ACCEPTED_FOR if who == "customer" else REFUSED_FOR), who)
        return who
