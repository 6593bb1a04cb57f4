"""STAND-IN for Stripe's HTTP API (api.stripe.com), which these machines cannot reach.

Only the calls billing makes are served: ``POST /v1/customers``, ``POST /v1/checkout/sessions``,
``POST /v1/billing_portal/sessions`` and ``DELETE /v1/subscriptions/<id>`` (a closed account's
subscription canceled at once: recorded in ``canceled``; a second cancel is Stripe's 400).
They behave as Stripe documents: form-encoded bodies with bracketed keys,
``Authorization: Bearer sk_...`` (401 otherwise), ``Idempotency-Key``
replaying the first answer (400 when reused with other parameters), Stripe's error JSON, and
objects shaped like Stripe's. ``complete_checkout`` makes the webhook events Stripe would send
when the customer pays, from what the checkout asked for, so the tests carry the metadata our
code put on the session through to the webhooks as Stripe does. It is a stand-in, not Stripe:
no card, tax or proration logic.

With ``base_url`` set (where the stand-in is served), it also serves the hosted pages a
browser is sent to, each labelled as the stand-in: Checkout at ``/c/pay/<session id>``, whose
"Pay" button completes the checkout (the same events as ``complete_checkout``, signed with
``webhook_secret`` and posted to ``webhook_url``, as Stripe would) and then sends the browser
to the session's ``success_url``; the billing portal at ``/p/session/<id>``; and invoices at
``/i/<invoice id>``. Without it, URLs point at Stripe's hosts, as before.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import httpx
from litestar import Litestar, Request, Response, delete, get, post
from litestar.params import FromPath
from litestar.response import Redirect

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
    portals: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    fail_next: int = 0  # answer this many requests with Stripe's 500 api_error
    # Where the stand-in is served (for its hosted pages), and where its webhooks go.
    base_url: str | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None
    # What the first invoice of a subscription charges (Stripe reads it from the price).
    invoice_amount: int = 4900
    currency: str = "eur"
    invoices: dict[str, dict[str, Any]] = field(default_factory=dict)
    webhooks_sent: list[tuple[str, int]] = field(default_factory=list)
    # Subscription ids canceled through DELETE /v1/subscriptions/<id>, in order.
    canceled: list[str] = field(default_factory=list)
    _idempotent: dict[str, tuple[dict[str, Any], int, dict[str, Any]]] = field(default_factory=dict)

    def app(self) -> Litestar:
        """The HTTP server, for uvicorn."""

        @post(["/v1/customers", "/v1/checkout/sessions", "/v1/billing_portal/sessions"])
        async def create(request: Request[Any, Any, Any]) -> Response[Any]:
            return self._handle(request.url.path, request.headers, await request.body())

        @delete("/v1/subscriptions/{subscription_id:str}", status_code=200)
        async def cancel(request: Request[Any, Any, Any]) -> Response[Any]:
            return self._handle(request.url.path, request.headers, await request.body())

        @get("/c/pay/{session_id:str}", media_type="text/html")
        async def checkout_page(session_id: FromPath[str]) -> Response[str]:
            return self._checkout_page(session_id)

        @post("/c/pay/{session_id:str}", media_type="text/html")
        async def pay(session_id: FromPath[str]) -> Response[Any]:
            return await self._pay(session_id)

        @get("/p/session/{portal_id:str}", media_type="text/html")
        async def portal_page(portal_id: FromPath[str]) -> Response[str]:
            return self._portal_page(portal_id)

        @get("/i/{invoice_id:str}", media_type="text/html")
        async def invoice_page(invoice_id: FromPath[str]) -> Response[str]:
            invoice = self.invoices.get(invoice_id)
            if invoice is None:
                return _page("No such invoice", "<p>The stand-in has no such invoice.</p>", 404)
            amount = f"{invoice['amount_paid'] / 100:.2f} {invoice['currency'].upper()}"
            body = f"<p>Invoice {html.escape(invoice['number'])}: {amount}, paid.</p>"
            return _page("Invoice", body)

        return Litestar(
            [create, cancel, checkout_page, pay, portal_page, invoice_page], debug=False
        )

    def _hosted(self, path: str, stripe_host: str) -> str:
        base = self.base_url.rstrip("/") if self.base_url else stripe_host
        return f"{base}{path}"

    def _checkout_page(self, session_id: str) -> Response[str]:
        session = self.sessions.get(session_id)
        if session is None or session["status"] != "open":
            return _page("Checkout", "<p>This checkout session is not open.</p>", 404)
        plan = html.escape(str(session["metadata"].get("plan", session["_price"])))
        amount = f"{self.invoice_amount / 100:.2f} {self.currency.upper()}"
        body = (
            f"<p>Subscribe to <strong>{plan}</strong>: {amount} a month.</p>"
            f'<form method="post" action="/c/pay/{html.escape(session_id)}">'
            '<button type="submit">Pay</button></form>'
            f'<p><a href="{html.escape(session["cancel_url"])}">Cancel and go back</a></p>'
        )
        return _page("Checkout", body)

    async def _pay(self, session_id: str) -> Response[Any]:
        session = self.sessions.get(session_id)
        if session is None or session["status"] != "open":
            return _page("Checkout", "<p>This checkout session is not open.</p>", 404)
        await self.send_webhooks(self.complete_checkout(session_id))
        success = str(session["success_url"]).replace("{CHECKOUT_SESSION_ID}", session_id)
        return Redirect(success, status_code=303)

    def _portal_page(self, portal_id: str) -> Response[str]:
        portal = self.portals.get(portal_id)
        if portal is None:
            return _page("Billing portal", "<p>No such portal session.</p>", 404)
        body = (
            "<p>Here Stripe lets the customer change plan or card, see invoices and cancel.</p>"
            f'<p><a href="{html.escape(str(portal["return_url"]))}">Return to your account</a></p>'
        )
        return _page("Billing portal", body)

    async def send_webhooks(self, events: list[dict[str, Any]]) -> None:
        """Post ``events`` to ``webhook_url``, each signed as Stripe signs, in order."""
        assert self.webhook_url and self.webhook_secret, "tell the stand-in where webhooks go"
        async with httpx.AsyncClient(timeout=30) as client:
            for event in events:
                payload = json.dumps(event).encode()
                answer = await client.post(
                    self.webhook_url,
                    content=payload,
                    headers={
                        "Content-Type": "application/json",
                        "Stripe-Signature": _signature(payload, self.webhook_secret),
                    },
                )
                self.webhooks_sent.append((event["type"], answer.status_code))

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
        if path.startswith("/v1/subscriptions/"):
            return self._cancel(path.rsplit("/", 1)[1])
        customer = params.get("customer")
        if customer not in self.customers:
            return 400, _error_body("invalid_request_error", f"No such customer: '{customer}'")
        portal_id = f"test_{secrets.token_urlsafe(24)}"
        portal = {
            "id": _id("bps"),
            "object": "billing_portal.session",
            "customer": customer,
            "return_url": params.get("return_url"),
            "url": self._hosted(f"/p/session/{portal_id}", "https://billing.stripe.com"),
            "livemode": False,
        }
        self.portals[portal_id] = portal
        return 200, portal

    def _cancel(self, subscription_id: str) -> tuple[int, dict[str, Any]]:
        if subscription_id in self.canceled:
            return 400, _error_body(
                "invalid_request_error",
                "A canceled subscription can only update its cancellation_details and metadata.",
            )
        self.canceled.append(subscription_id)
        return 200, {
            "id": subscription_id,
            "object": "subscription",
            "status": "canceled",
            "canceled_at": int(time.time()),
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
            "url": self._hosted(f"/c/pay/{session_id}", "https://checkout.stripe.com"),
            "expires_at": int(time.time()) + 86400,
            "livemode": False,
            # Kept to build the subscription when the customer pays; Stripe keeps it too.
            "_price": price,
            "_subscription_metadata": (params.get("subscription_data") or {}).get("metadata", {}),
        }
        self.sessions[session_id] = session
        return 200, {k: v for k, v in session.items() if not k.startswith("_")}

    def complete_checkout(self, session_id: str, at: int | None = None) -> list[dict[str, Any]]:
        """The events Stripe sends when the customer pays: the completed session, the
        subscription it created (with the metadata the checkout put on ``subscription_data``),
        then its first invoice, paid."""
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
        invoice = self._first_invoice(session["customer"], subscription_id, now)
        return [
            _event("checkout.session.completed", completed, now),
            _event("customer.subscription.created", subscription, now),
            _event("invoice.paid", invoice, now),
        ]

    def _first_invoice(self, customer: str, subscription_id: str, now: int) -> dict[str, Any]:
        invoice_id = _id("in")
        invoice = {
            "id": invoice_id,
            "object": "invoice",
            "number": f"STANDIN-{len(self.invoices) + 1:04d}",
            "status": "paid",
            "paid": True,
            "amount_due": self.invoice_amount,
            "amount_paid": self.invoice_amount,
            "currency": self.currency,
            "created": now,
            "hosted_invoice_url": self._hosted(f"/i/{invoice_id}", "https://invoice.stripe.com"),
            "customer": customer,
            "subscription": subscription_id,
            "billing_reason": "subscription_create",
            "livemode": False,
        }
        self.invoices[invoice_id] = invoice
        return invoice


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


def _signature(payload: bytes, secret: str) -> str:
    """A Stripe-Signature header, as Stripe makes it (``tests/stripe_signing.py`` does the
    same for the tests that post webhooks themselves)."""
    timestamp = int(time.time())
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def _page(title: str, body: str, status: int = 200) -> Response[str]:
    """A hosted page of the stand-in, labelled as such so no one takes it for Stripe."""
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)} · Stripe stand-in</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:0;color:#1b2430}"
        "header{background:#5b3f8f;color:#fff;padding:.75rem 1.25rem}"
        "main{max-width:32rem;margin:0 auto;padding:1.25rem}"
        "button{background:#1d6b33;color:#fff;border:0;border-radius:.35rem;"
        "padding:.6rem 1.4rem;font:inherit;font-weight:600;min-height:44px}"
        "a{color:#0b5f8a}</style></head><body>"
        "<header><p><strong>STAND-IN for Stripe</strong> (a test double: no card is "
        "charged)</p></header>"
        f"<main><h1>{html.escape(title)}</h1>{body}</main></body></html>"
    )
    return Response(page, status_code=status, media_type="text/html")


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def _error_body(kind: str, message: str) -> dict[str, Any]:
    return {"error": {"type": kind, "message": message}}


def _error(status: int, kind: str, message: str) -> Response[Any]:
    return Response(_error_body(kind, message), status_code=status)
