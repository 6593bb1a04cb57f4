"""libs.http.validation: every refusal names the field and the reason, in the API's error shape."""

from __future__ import annotations

import msgspec
import pytest

from libs.http.errors import InvalidRequest
from libs.http.validation import FieldErrors, convert, decode, json_object


class Checkout(msgspec.Struct, forbid_unknown_fields=True):
    plan: str
    seats: int = 1


class Nested(msgspec.Struct, forbid_unknown_fields=True):
    checkout: Checkout


def refusal(call: object) -> list[dict[str, str]]:
    with pytest.raises(InvalidRequest) as raised:
        call()  # type: ignore[operator]
    assert raised.value.status_code == 400
    return raised.value.fields  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        (b'{"seats": 2}', "plan", "is required"),
        (b'{"plan": 1}', "plan", "Expected `str`, got `int`"),
        (b'{"plan": "pro", "admin": true}', "admin", "is not a known field"),
        (b'{"plan": "pro"', "body", "is not JSON"),
        (b"[1]", "body", "Expected `object`, got `array`"),
    ],
)
def test_decode_names_the_field_and_the_reason(body: bytes, field: str, reason: str) -> None:
    assert refusal(lambda: decode(body, Checkout)) == [{"field": field, "reason": reason}]


def test_a_nested_field_is_named_by_its_path() -> None:
    fields = refusal(lambda: convert({"checkout": {"plan": "pro", "x": 1}}, Nested))
    assert fields == [{"field": "checkout.x", "reason": "is not a known field"}]
    assert refusal(lambda: convert({"checkout": {}}, Nested)) == [
        {"field": "checkout.plan", "reason": "is required"}
    ]


class Batch(msgspec.Struct):
    items: list[Checkout]


def test_a_field_inside_a_list_keeps_its_index() -> None:
    assert refusal(lambda: convert({"items": [{"plan": "a"}, {"plan": 2}]}, Batch)) == [
        {"field": "items[1].plan", "reason": "Expected `str`, got `int`"}
    ]
    assert refusal(lambda: convert({"items": [{}]}, Batch)) == [
        {"field": "items[0].plan", "reason": "is required"}
    ]


def test_a_good_body_decodes() -> None:
    assert decode(b'{"plan": "pro", "seats": 3}', Checkout) == Checkout("pro", 3)
    assert convert({"plan": "pro"}, Checkout) == Checkout("pro")


def test_field_errors_collects_every_field_before_refusing() -> None:
    errors = FieldErrors()
    data = json_object({"name": " a\x00b ", "extra": 1, "long": "x" * 9})
    errors.unknown(data, {"name", "long", "missing"})
    assert errors.text(data, "name", required=True, limit=10) is None
    assert errors.text(data, "long", required=True, limit=5) is None
    assert errors.text(data, "missing", required=True, limit=5) is None
    assert errors.text(data, "optional", required=False, limit=5) is None
    assert refusal(errors.raise_if_any) == [
        {"field": "extra", "reason": "is not a known field"},
        {"field": "name", "reason": "must not contain control characters"},
        {"field": "long", "reason": "must be at most 5 characters"},
        {"field": "missing", "reason": "is required"},
    ]
    assert refusal(lambda: json_object([1])) == [
        {"field": "body", "reason": "must be a JSON object"}
    ]


def test_no_errors_no_refusal() -> None:
    errors = FieldErrors()
    assert errors.text({"name": " ok "}, "name", required=True, limit=5) == "ok"
    errors.raise_if_any()
    assert not errors
