"""``/admin/customers``: the operators' customers page.

A search over the account view (email, company, customer id) with each customer's state, plan,
subscription, instance health and signup time, and a page per customer with their invoices,
usage and last events. Read models only: nothing here changes anything, so there are no forms
with side effects (the search is a GET). Behind the admin credential as ``/admin/queues`` is
(``libs.http.auth.admin_page_guard``: HTTP Basic with the admin token as password, or the
bearer token). Every value shown is escaped by the templates: emails and company names come
from whoever signed up.

The search is bounded: at most ``SEARCH_MAX`` characters, matched literally (``%``, ``_`` and
``\\`` are escaped before ``ILIKE``), ``PAGE_SIZE`` rows a page up to page ``MAX_PAGE``, and a
statement timeout, so no query string can make it scan for long or answer without end.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlencode

import asyncpg
from litestar import Controller, Response, Router, get
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, QueryParameter

from libs.http.auth import admin_page_guard
from libs.http.validation import FieldErrors
from libs.runtime.service import ServiceRuntime
from services.signup.account_view import invoices_of, usage_of
from services.signup.customer_events import last_events
from services.signup.settings import SignupSettings
from services.signup.web import PAGES

SEARCH_MAX = 200
PAGE_SIZE = 25
MAX_PAGE = 400
CUSTOMER_ID_MAX = 128
STATEMENT_TIMEOUT = "5s"
# The column of email verification, once the account view keeps one (shown as unknown before).
VERIFIED_COLUMNS = ("email_verified", "email_verified_at")

SEARCH_SQL = """
    SELECT * FROM accounts
    WHERE $1 = '' OR email ILIKE $2 ESCAPE '\\' OR company_name ILIKE $2 ESCAPE '\\'
          OR customer_id LIKE $3 ESCAPE '\\'
    ORDER BY signed_up_at DESC, customer_id
    LIMIT $4 OFFSET $5
"""


@dataclass(frozen=True)
class Search:
    """What the operator searched for, and which page of the answer."""

    text: str = ""
    page: int = 1

    def link(self, page: int) -> str:
        """The address of another page of the same search."""
        query = {"q": self.text} if self.text else {}
        return "/admin/customers?" + urlencode({**query, "page": page})


def parse_search(text: str, page: str) -> tuple[Search, FieldErrors]:
    """The search, or the first page of no search with the reasons its fields were refused."""
    errors = FieldErrors()
    text = text.strip()
    if len(text) > SEARCH_MAX:
        errors.add("q", f"must be at most {SEARCH_MAX} characters")
    elif any(ord(c) < 32 or ord(c) == 127 for c in text):
        errors.add("q", "must not contain control characters")
    number = int(page) if page.isdigit() and len(page) <= 4 else 0
    if not 1 <= number <= MAX_PAGE:
        errors.add("page", f"must be a whole number from 1 to {MAX_PAGE}")
    if errors:
        return Search(), errors
    return Search(text, number), errors


def literal_like(text: str) -> str:
    """``text`` matched literally inside a ``LIKE ... ESCAPE '\\'`` pattern."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def search_customers(pool: asyncpg.Pool, search: Search) -> tuple[list[Any], bool]:
    """One page of customers matching the search, newest signups first, and whether there is
    a next page."""
    escaped = literal_like(search.text)
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        await conn.execute(f"SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'")
        rows = await conn.fetch(
            SEARCH_SQL,
            search.text,
            f"%{escaped}%",
            f"{escaped.lower()}%",
            PAGE_SIZE + 1,
            (search.page - 1) * PAGE_SIZE,
        )
    return [customer_line(row) for row in rows[:PAGE_SIZE]], len(rows) > PAGE_SIZE


def shown_time(value: datetime | None) -> str:
    """A time as the page shows it (UTC, to the second), or nothing."""
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else ""


def email_verified(row: Any) -> bool | None:
    """Whether the customer verified their email, if the account view knows."""
    columns = set(row.keys())
    for column in VERIFIED_COLUMNS:
        if column in columns:
            return row[column] is not None and row[column] is not False
    return None


ERASED = "(erased)"


def customer_line(row: Any) -> dict[str, Any]:
    """What the page shows of a customer's account row ("(erased)" for the personal data of
    an erased customer)."""
    erased = row.get("erased_at") is not None
    state = "erased" if erased else "closed" if row["closed_at"] is not None else "active"
    return {
        "customer_id": row["customer_id"],
        "email": ERASED if erased else row["email"],
        "company_name": ERASED if erased else row["company_name"],
        "full_name": None if erased else row["full_name"],
        "state": state,
        "closed_at": shown_time(row["closed_at"]),
        "plan": row["plan"],
        "subscription_status": row["subscription_status"],
        "email_verified": email_verified(row),
        "deployment_status": row["deployment_status"],
        "health_reason": row["instance_health_reason"],
        "instance_url": row["instance_url"],
        "signed_up_at": shown_time(row["signed_up_at"]),
    }


def health_badge(status: str) -> str:
    """The badge colour of a deployment status."""
    if status == "ready":
        return "ok"
    if status in ("failed", "degraded", "removed"):
        return "bad"
    return "warn"


# Currencies whose minor unit is the unit itself (Stripe's list of zero-decimal currencies).
ZERO_DECIMAL = frozenset(
    {
        *("bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga"),
        *("pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"),
    }
)


def money(amount: int, currency: str) -> str:
    """An amount in minor units as an operator reads it, with the currency's code."""
    if currency.lower() in ZERO_DECIMAL:
        return f"{amount:,} {currency.upper()}"
    return f"{amount / 100:,.2f} {currency.upper()}"


class AdminCustomersController(Controller):
    """The customers page and a customer's page; ``admin_customers_router`` guards them."""

    path = "/admin/customers"
    include_in_schema = False

    @get("/")
    async def customers(
        self,
        pool: NamedDependency[asyncpg.Pool],
        q: Annotated[str, QueryParameter(name="q", required=False)] = "",
        page: Annotated[str, QueryParameter(name="page", required=False)] = "1",
    ) -> Response[str]:
        """Customers matching the search (all of them without one), a page at a time."""
        search, errors = parse_search(q, page)
        if errors:
            problem = "; ".join(f"{f['field']} {f['reason']}" for f in errors.fields)
            return PAGES.render(
                "admin_customers.html",
                400,
                title="Customers",
                search=Search(q[:SEARCH_MAX]),
                customers=[],
                newer=None,
                older=None,
                problem=f"The search was not run: {problem}.",
                badge=health_badge,
            )
        customers, more = await search_customers(pool, search)
        return PAGES.render(
            "admin_customers.html",
            title="Customers",
            search=search,
            customers=customers,
            newer=search.link(search.page - 1) if search.page > 1 else None,
            older=search.link(search.page + 1) if more and search.page < MAX_PAGE else None,
            badge=health_badge,
        )

    @get("/{customer_id:str}")
    async def customer(
        self, customer_id: FromPath[str], pool: NamedDependency[asyncpg.Pool]
    ) -> Response[str]:
        """One customer: account, subscription, instance, usage, invoices and last events."""
        row = None
        if len(customer_id) <= CUSTOMER_ID_MAX:
            row = await pool.fetchrow("SELECT * FROM accounts WHERE customer_id = $1", customer_id)
        if row is None:
            return PAGES.render(
                "admin_customer.html",
                404,
                title="No such customer",
                customer=None,
                problem="No customer has this id.",
            )
        invoices = await invoices_of(pool, customer_id)
        events = await last_events(pool, customer_id)
        return PAGES.render(
            "admin_customer.html",
            title=f"Customer {row['company_name'] or row['customer_id']}",
            customer=customer_line(row),
            current_period_end=shown_time(row["current_period_end"]),
            trial_ends_at=shown_time(row["trial_ends_at"]),
            usage=await usage_of(pool, row),
            invoices=[
                {
                    "number": invoice.number,
                    "status": invoice.status,
                    "amount": money(invoice.amount, invoice.currency),
                    "created_at": invoice.created_at.date().isoformat(),
                    "url": invoice.url,
                }
                for invoice in invoices
            ],
            events=[
                {
                    "type": event["event_type"],
                    "at": shown_time(event["occurred_at"]),
                    "summary": event["summary"],
                }
                for event in events
            ],
            badge=health_badge,
        )


def admin_customers_router(runtime: ServiceRuntime) -> Router:
    """The customers pages behind the admin credential (Basic or Bearer, the admin token)."""
    settings = runtime.settings_as(SignupSettings)

    def pool() -> asyncpg.Pool:
        return runtime.db()

    return Router(
        path="/",
        route_handlers=[AdminCustomersController],
        guards=[admin_page_guard(settings.admin_token)],
        dependencies={"pool": Provide(pool, sync_to_thread=False)},
    )
