"""The signup and login forms' checks, alone: every bad field named with its reason, at once."""

from __future__ import annotations

from typing import Any

import pytest

from libs.http.errors import InvalidRequest
from services.signup.models import LoginForm, SignupForm, parse_login, parse_signup

GOOD = {
    "email": " Ada@Example.com ",
    "password": "a long and rare phrase",
    "company_name": " Air Quality Ltd ",
}


def refusal(parse: Any, body: Any) -> list[dict[str, str]]:
    with pytest.raises(InvalidRequest) as refused:
        parse(body)
    assert refused.value.message == "invalid request"
    return list(refused.value.fields or [])


def test_a_good_signup_is_trimmed_and_its_email_lower_cased() -> None:
    assert parse_signup({**GOOD, "full_name": "  "}) == SignupForm(
        email="ada@example.com",
        email_display="Ada@Example.com",
        password="a long and rare phrase",
        company_name="Air Quality Ltd",
        full_name=None,
    )


def test_every_bad_signup_field_is_named_in_order() -> None:
    fields = refusal(
        parse_signup,
        {"zeta": 1, "alpha": 2, "email": 7, "password": "short", "full_name": "bell\x07"},
    )
    assert fields == [
        {"field": "alpha", "reason": "is not a known field"},
        {"field": "zeta", "reason": "is not a known field"},
        {"field": "email", "reason": "must be a string"},
        {"field": "password", "reason": "must be at least 8 characters"},
        {"field": "company_name", "reason": "is required"},
        {"field": "full_name", "reason": "must not contain control characters"},
    ]


@pytest.mark.parametrize(
    ("password", "reason"),
    [
        (None, "is required"),
        (12345678, "must be a string"),
        ("x" * 129, "must be at most 128 characters"),
        ("password1", "is too common; choose another"),
    ],
)
def test_each_password_rule_has_its_reason(password: Any, reason: str) -> None:
    body = {**GOOD, "password": password}
    if password is None:
        del body["password"]
    assert refusal(parse_signup, body) == [{"field": "password", "reason": reason}]


def test_an_email_that_is_not_one_says_why() -> None:
    [field] = refusal(parse_signup, {**GOOD, "email": "a@b"})
    assert field["field"] == "email"
    assert "after the @-sign" in field["reason"]


def test_a_body_that_is_not_an_object_is_named_as_the_body() -> None:
    for parse in (parse_signup, parse_login):
        assert refusal(parse, ["a"]) == [{"field": "body", "reason": "must be a JSON object"}]


def test_a_login_is_checked_for_shape_only() -> None:
    # A common or short password is for the 401 to refuse, never named as such.
    assert parse_login({"email": "Ada@Example.com", "password": "x"}) == LoginForm(
        email="ada@example.com", password="x"
    )
    assert refusal(parse_login, {"email": "", "password": "", "remember": True}) == [
        {"field": "remember", "reason": "is not a known field"},
        {"field": "email", "reason": "is required"},
        {"field": "password", "reason": "is required"},
    ]
    assert refusal(parse_login, {"email": "a@example.com", "password": "x" * 129}) == [
        {"field": "password", "reason": "must be at most 128 characters"}
    ]
