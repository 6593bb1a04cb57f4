"""Signed POSTs to the customer's own systems: alert webhooks and integrations send the same way.

A body is signed with HMAC-SHA256 under a secret shown to the customer once
(``X-Iotistic-Signature: sha256=<hex>`` over ``<timestamp>.<body>``, the timestamp in
``X-Iotistic-Timestamp``), and POSTed to an address the URL's host resolves to at that moment,
checked again (``webhook_targets.WebhookTargets``: public addresses only, unless an operator
allows a network), so a name that resolves elsewhere by the time of delivery cannot lead the
POST into the instance's own network. An answer below 300 is a delivery; anything else is a
failed attempt, described in a few words for the customer to read. The answer's body is not
read: a receiver that sends an endless one cannot fill the instance's memory or hold it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time

import httpx

from services.instance.webhook_targets import WebhookRefused, WebhookTargets

log = logging.getLogger(__name__)

# One POST, all the addresses of its host included: a receiver that trickles its answer cannot
# hold the sender for longer.
DELIVERY_SECONDS = 30.0


def sign(secret: str, timestamp: str, body: str) -> str:
    """``sha256=<hex>`` of HMAC-SHA256(secret, "<timestamp>.<body>")."""
    mac = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def sender() -> httpx.AsyncClient:
    """A client for signed POSTs. No proxy from the environment: the connection goes to the
    address that was checked."""
    return httpx.AsyncClient(timeout=10, trust_env=False)


async def post_signed(
    client: httpx.AsyncClient,
    targets: WebhookTargets,
    url: str,
    body: str,
    secret: str,
    headers: dict[str, str] | None = None,
) -> str | None:
    """POST ``body`` signed with ``secret`` to ``url`` (with ``headers`` besides), within
    ``DELIVERY_SECONDS``: None once delivered, else what went wrong. An error nobody foresaw
    is raised for the caller to count."""
    stamp = str(int(time.time()))
    signed = {
        **(headers or {}),
        "Content-Type": "application/json",
        "X-Iotistic-Timestamp": stamp,
        "X-Iotistic-Signature": sign(secret, stamp, body),
    }
    try:
        async with asyncio.timeout(DELIVERY_SECONDS):
            return await _post(client, targets, url, body, signed)
    except TimeoutError:
        return "timed out"


async def _post(
    client: httpx.AsyncClient,
    targets: WebhookTargets,
    url: str,
    body: str,
    headers: dict[str, str],
) -> str | None:
    """POST to an address the URL resolves to now, checked; None, or what went wrong."""
    try:
        target = await targets.resolve(url)
    except WebhookRefused as exc:
        log.warning("webhook refused: %s", exc)
        return f"refused: {exc}"[:500]
    error = "not reachable"
    for address in target.addresses:
        pinned, host, extensions = target.via(address)
        try:
            # Only the status is read: a receiver's body, however long, is never taken in.
            async with client.stream(
                "POST", pinned, content=body, headers={**headers, **host}, extensions=extensions
            ) as answer:
                status = answer.status_code
        except httpx.ConnectError:
            error = "ConnectError"
            continue  # the next address the name resolved to, checked as well
        except httpx.HTTPError as exc:
            return type(exc).__name__
        return None if status < 300 else f"answered {status}"
    return error
