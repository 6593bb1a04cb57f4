"""Checking what a client sent, once, the same way in every service.

A route names what it accepts; what is wrong is answered with one 400 that lists each bad field
and why (``{"field": ..., "reason": ...}``), every field at once, never a stack trace. Bodies with
a fixed shape are decoded into a ``msgspec.Struct`` (``decode``); forms with rules msgspec cannot
say (an e-mail address, a common password) are checked field by field with ``FieldErrors``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import msgspec

from libs.http.errors import InvalidRequest

T = TypeVar("T")
# msgspec's "- at `$.a[0].b`": the whole path, so a field inside a list keeps its index.
_AT = re.compile(r" - at `\$\.?(?P<field>[^`]*)`$")


class FieldErrors:
    """The bad fields of one request, collected so the answer names them all."""

    def __init__(self) -> None:
        self.fields: list[dict[str, str]] = []

    def add(self, field: str, reason: str) -> None:
        """Record that ``field`` is wrong, and why."""
        self.fields.append({"field": field[:64], "reason": reason})

    def __bool__(self) -> bool:
        return bool(self.fields)

    def raise_if_any(self, message: str = "invalid request") -> None:
        """A 400 naming every recorded field, if there is one."""
        if self.fields:
            raise InvalidRequest(message, fields=self.fields)

    def unknown(self, data: Mapping[str, Any], allowed: Iterable[str]) -> None:
        """Record each field of ``data`` that is not one of ``allowed``."""
        for name in sorted(set(data) - set(allowed), key=str):
            self.add(str(name), "is not a known field")

    def text(self, data: Mapping[str, Any], name: str, *, required: bool, limit: int) -> str | None:
        """``data[name]`` as stripped text of at most ``limit`` characters without control
        characters, or None (recording why when it is wrong or missing but required)."""
        value = data.get(name)
        if value is None:
            if required:
                self.add(name, "is required")
            return None
        if not isinstance(value, str):
            self.add(name, "must be a string")
            return None
        value = value.strip()
        if required and not value:
            self.add(name, "is required")
            return None
        if len(value) > limit:
            self.add(name, f"must be at most {limit} characters")
            return None
        if any(unicodedata.category(c) == "Cc" for c in value):
            self.add(name, "must not contain control characters")
            return None
        return value


def json_object(data: Any, message: str = "invalid request") -> dict[str, Any]:
    """``data`` if it is a JSON object, else a 400 saying the body must be one."""
    if not isinstance(data, dict):
        raise InvalidRequest(message, fields=[{"field": "body", "reason": "must be a JSON object"}])
    return data


def _refusal(exc: msgspec.ValidationError, message: str) -> InvalidRequest:
    text = str(exc)
    match = _AT.search(text)
    field = (match.group("field") if match else None) or "body"
    reason = text[: match.start()] if match else text
    if reason.startswith(("Object missing required field", "Object contains unknown field")):
        name = reason.split("`")[1]
        field = name if field == "body" else f"{field}.{name}"
        reason = "is required" if "missing" in reason else "is not a known field"
    return InvalidRequest(message, fields=[{"field": field[:64], "reason": reason}])


def decode(body: bytes, type_: type[T], message: str = "invalid request") -> T:
    """A JSON body decoded into ``type_``, or a 400 naming the field msgspec refused and why."""
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        raise _refusal(exc, message) from None
    except msgspec.DecodeError:
        raise InvalidRequest(message, fields=[{"field": "body", "reason": "is not JSON"}]) from None


def convert(data: Any, type_: type[T], message: str = "invalid request") -> T:
    """Already-parsed JSON (``data``) converted into ``type_``, or a 400 as ``decode`` gives."""
    try:
        return msgspec.convert(data, type=type_)
    except msgspec.ValidationError as exc:
        raise _refusal(exc, message) from None
