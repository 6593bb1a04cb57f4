"""Erasure attacked: the abuse limits' counters keyed by an unkeyed hash of the email (a failed
login, a password reset asked for) are gone once the customer is erased, not at their window's
end, so nobody guessing the address can match it; a customer's own session cannot use the
operators' erase route, and an open account is not erased. Signup, licensing and billing on
real Postgres and JetStream (test_erasure's platform).
"""

from __future__ import annotations

import logging

import pytest
from account_flows import PASSWORD, bearer, log_in
from test_erasure import (
    Person,
    admin,
    client,
    erased_everywhere,
    platform,
    sign_up,
    tables_text,
    verify_email,
)

from libs.config import ServiceSettings
from libs.runtime.platform import Platform
from services.signup.limits import email_key

__all__ = ["admin", "client", "platform"]  # fixtures

pytestmark = pytest.mark.slow


async def test_the_email_hash_of_the_limits_goes_with_the_erasure(
    client, platform: Platform, settings: ServiceSettings, admin
) -> None:
    person = Person.new("hashed")
    customer_id = await sign_up(client, person)
    session = await log_in(client, person.email)
    wrong = await client.post(
        "/api/customers/login", json={"email": person.email, "password": "not it at all 1"}
    )
    assert wrong.status_code == 401, wrong.text
    reset = await client.post("/api/customers/password-reset", json={"email": person.email})
    assert reset.status_code < 500, reset.text
    key = email_key(person.email)
    assert any(key in text for text in (await tables_text(settings.database_url)).values())

    # Their own session is no operator's; their open account is not erased.
    own = await client.post(f"/api/customers/{customer_id}/erase", headers=bearer(session))
    assert own.status_code in {401, 403}, own.text
    still_open = await client.post(f"/api/customers/{customer_id}/erase", headers=admin)
    assert still_open.status_code == 409, still_open.text

    closed = await client.post(
        "/api/customers/me/close",
        json={"password": PASSWORD, "erase": True},
        headers=bearer(session),
    )
    assert closed.status_code == 200, closed.text
    await erased_everywhere(platform, customer_id)
    found = [n for n, text in (await tables_text(settings.database_url)).items() if key in text]
    assert found == []


async def test_no_log_line_names_the_person_from_signup_to_erasure(
    client, platform: Platform, settings: ServiceSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    person = Person.new("logged")
    customer_id = await sign_up(client, person)
    await verify_email(client, platform, person)
    wrong = await client.post(
        "/api/customers/login", json={"email": person.email, "password": "not it at all 2"}
    )
    assert wrong.status_code == 401, wrong.text
    session = await log_in(client, person.email)
    await client.post("/api/customers/password-reset", json={"email": person.email})
    closed = await client.post(
        "/api/customers/me/close",
        json={"password": PASSWORD, "erase": True, "reason": f"bye from {person.full_name}"},
        headers=bearer(session),
    )
    assert closed.status_code == 200, closed.text
    await erased_everywhere(platform, customer_id)
    assert caplog.records
    text = "\n".join(r.getMessage() for r in caplog.records).lower()
    named = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if person.email.lower() in r.getMessage().lower()
    ]
    assert [s for s in person.strings if s.lower() in text] == [], named[:5]
