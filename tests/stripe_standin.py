"""STAND-IN for Stripe's HTTP API (api.stripe.com), which these machines cannot reach.

Only the calls billing makes are served: ``POST /v1/customers``, ``POST /v1/checkout/sessions``
and ``POST /v1/billing_portal/sessions``. They behave as Stripe documents: form-encoded bodies
with bracketed keys, ``Authorization: Bearer sk_...`` (401 otherwise), ``Idempotency-Key``
replaying the first answer (400 when reused with other parameters), Stripe's error JSON, and
objects shaped like Stripe's. ``complete_checkout`` makes the webhook events Stripe would send
when the customer pays, from what the checkout asked for, so the tests carry the metadata our
code put on the session through to the webhooks as Stripe does. It is a stand-in, not Stripe:
no card, tax or proration logic.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from litestar import Litestar, Request, Response, post

API_KEY = "sk_test_standin_" + "k3y" * 8


def unflatten(form: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's bracketed form keys (``a[b][0][c]=v``) as nested dicts and lists."""
    root: dict[str, Any] = {}
    for key, value in form:
        parts = key.replace("]", "").split("[")
        node: Any = root
        for part, following in zip(parts, [*parts[1:], None], strict=True):
            if following is None:
                node[part if not isinstance(node, list) else int(part)] = value
                break
            child: Any = [] if following.isdigit() else {}
            if isinstance(node, list):
                index = int(part)
                while len(node) <= index:
                    node.append(None)
                node[index] = node[index] if node[index] is not None else child
                node = node[index]
            else:
                node = node.setdefault(part, child)
    return root


@dataclass
class StripeStandIn:
    """The stand-in's state: objects created, requests seen, failures to inject."""

    api_key: str = API_KEY
    prices: set[str] = field(default_factory=set)
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    fail_next: int = 0  # answer this many requests with Stripe's 500 api_error
    _idempotent: dict[str, tuple[dict[str, Any], int, dict[str, Any]]] = field(default_factory=dict)

    def app(self) -> Litestar:
        """The HTTP server, for uvicorn."""

        @post(["/v1/customers", "/v1/checkout/sessions", "/v1/billing_portal/sessions"])
        async def create(request: Request[Any, Any, Any]) -> Response[Any]:
            return self._handle(request.url.path, request.headers, await request.body())

        return Litestar([create], debug=False)

    def _handle(self, path: str, headers: Any, body: bytes) -> Response[Any]:
        params = unflatten(parse_qsl(body.decode(), keep_blank_values=True))
        self.requests.append((path, params))
        if headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "invalid_request_error", "Invalid API Key provided")
        if self.fail_next > 0:
            self.fail_next -= 1
            return _error(500, "api_error", "Something went wrong on Stripe's end.")
        key = headers.get("idempotency-key")
        earlier = self._idempotent.get(f"{path} {key}") if key else None
        if earlier is not None:
            first_params, status, answer = earlier
            if first_params != params:
                return _error(
                    400,
                    "idempotency_error",
                    "Keys for idempotent requests can only be used with the same parameters "
                    "they were first used with.",
                )
            return Response(answer, status_code=status, headers={"Idempotent-Replayed": "true"})
        status, answer = self._create(path, params)
        if key and status < 500:
            self._idempotent[f"{path} {key}"] = (params, status, answer)
        return Response(answer, status_code=status, headers={"Request-Id": _id("req")})

    def _create(self, path: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if path == "/v1/customers":
            customer = {
                "id": _id("cus"),
                "object": "customer",
                "created": int(time.time()),
                "email": params.get("email"),
                "name": params.get("name"),
                "metadata": params.get("metadata", {}),
                "livemode": False,
            }
            self.customers[customer["id"]] = customer
            return 200, customer
        if path == "/v1/checkout/sessions":
            return self._checkout(params)
        customer = params.get("customer")
        if customer not in self.customers:
            return 400, _error_body("invalid_request_error", f"No such customer: '{customer}'")
        return 200, {
            "id": _id("bps"),
            "object": "billing_portal.session",
            "customer": customer,
            "return_url": params.get("return_url"),
            "url": f"https://billing.stripe.com/p/session/test_{secrets.token_urlsafe(24)}",
            "livemode": False,
        }

    def _checkout(self, params: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if params.get("mode") != "subscription":
            return 400, _error_body("invalid_request_error", "mode must be subscription here")
        if params.get("customer") not in self.customers:
            return 400, _error_body(
                "invalid_request_error", f"No such customer: '{params.get('customer')}'"
            )
        items = params.get("line_items") or []
        price = items[0].get("price") if items and isinstance(items[0], dict) else None
        if price not in self.prices:
            return 400, _error_body("invalid_request_error", f"No such price: '{price}'")
        for url in ("success_url", "cancel_url"):
            if not str(params.get(url, "")).startswith(("http://", "https://")):
                return 400, _error_body("invalid_request_error", f"Invalid URL: {url}")
        session_id = f"cs_test_{secrets.token_hex(16)}"
        session = {
            "id": session_id,
            "object": "checkout.session",
            "mode": "subscription",
            "status": "open",
            "customer": params["customer"],
            "client_reference_id": params.get("client_reference_id"),
            "metadata": params.get("metadata", {}),
            "success_url": params["success_url"],
            "cancel_url": params["cancel_url"],
            "url": f"https://checkout.stripe.com/c/pay/{session_id}",
            "expires_at": int(time.time()) + 86400,
            "livemode": False,
            # Kept to build the subscription when the customer pays; Stripe keeps it too.
            "_price": price,
            "_subscription_metadata": (params.get("subscription_data") or {}).get("metadata", {}),
        }
        self.sessions[session_id] = session
        return 200, {k: v for k, v in session.items() if not k.startswith("_")}

    def complete_checkout(self, session_id: str, at: int | None = None) -> list[dict[str, Any]]:
        """The events Stripe sends when the customer pays: the completed session, then the
        subscription it created (with the metadata the checkout put on ``subscription_data``)."""
        session = self.sessions[session_id]
        now = int(time.time()) if at is None else at
        subscription_id = _id("sub")
        subscription = {
            "id": subscription_id,
            "object": "subscription",
            "customer": session["customer"],
            "status": "active",
            "created": now,
            "current_period_start": now,
            "current_period_end": now + 30 * 86400,
            "cancel_at_period_end": False,
            "items": {
                "object": "list",
                "data": [
                    {
                        "id": _id("si"),
                        "object": "subscription_item",
                        "price": {"id": session["_price"], "object": "price"},
                        "quantity": 1,
                    }
                ],
            },
            "metadata": session["_subscription_metadata"],
            "livemode": False,
        }
        session.update(status="complete", subscription=subscription_id, payment_status="paid")
        completed = {k: v for k, v in session.items() if not k.startswith("_")}
        return [
            _event("checkout.session.completed", completed, now),
            _event("customer.subscription.created", subscription, now),
        ]


def _event(event_type: str, obj: dict[str, Any], created: int) -> dict[str, Any]:
    return {
        "id": _id("evt"),
        "object": "event",
        "api_version": "2024-06-20",
        "created": created,
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": _id("req"), "idempotency_key": str(uuid.uuid4())},
        "type": event_type,
        "data": {"object": obj},
    }


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def _error_body(kind: str, message: str) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message}}


def _error(status: int, kind: str, message: str) -> Response[Any]:
    return Response(_error_body(kind, message), status_code=status)
