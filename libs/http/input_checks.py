"""What no route accepts, refused before any route runs (litestar's ``before_request``).

``check_request_input`` checks what a client sent once: control characters in the path or a
query value, a parameter given twice, and in a JSON body invalid UTF-8, nesting deeper than
``MAX_JSON_DEPTH``, a NUL in a string or an integer beyond 64 bits. Each is a 400 naming the
field and the reason. Values that get past that and still cannot be taken (a time or number out
of range, a character Postgres cannot store) are 400s too, from ``libs/http/errors.py``, rather
than the 500 they would otherwise be.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import msgspec
from litestar import Request

from libs.http.errors import MAX_JSON_DEPTH, invalid
from libs.observability.logs import CONTROL_CHARACTERS, escape_control

MAX_QUERY_PARAMETERS = 50
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def control_character_reason(text: str) -> str | None:
    """Why ``text`` may not be taken as it is (its first control character), or None."""
    for character in text:
        if ord(character) in CONTROL_CHARACTERS:
            return f"must not contain control characters (found U+{ord(character):04X})"
    return None


def _check_path(path: str) -> None:
    reason = control_character_reason(path)
    if reason:
        raise invalid("path", reason)


def _check_query(raw: bytes) -> None:
    try:
        pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise invalid("query", "is not valid UTF-8 once percent-decoded") from None
    seen: set[str] = set()
    for name, value in pairs:
        field = escape_control(name)[:64]
        reason = control_character_reason(name) or control_character_reason(value)
        if reason:
            raise invalid(field, reason)
        if name in seen:
            # No parameter of ours is a list: a second value would be silently ignored.
            raise invalid(field, "is given more than once")
        seen.add(name)
    if len(seen) > MAX_QUERY_PARAMETERS:
        raise invalid("query", f"has more than {MAX_QUERY_PARAMETERS} parameters")


def _json_problem(value: Any) -> tuple[str, str] | None:
    """The first field (a JSON path) of a decoded body that no route may take, and why."""
    pending: list[tuple[str, Any, int]] = [("", value, 0)]
    while pending:
        path, item, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            # The body as a whole, as when the decoder itself gives up (how deep that is depends
            # on the process's recursion limit): the path would be the depth in brackets.
            return "body", f"is nested too deeply (at most {MAX_JSON_DEPTH} levels)"
        if isinstance(item, str):
            if "\x00" in item:
                return path or "body", "must not contain NUL characters"
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int):
            if not INT64_MIN <= item <= INT64_MAX:
                return path or "body", "is out of range (a 64-bit integer at most)"
        elif isinstance(item, dict):
            for key, member in item.items():
                name = f"{path}.{key}" if path else str(key)
                if "\x00" in key:
                    return escape_control(name)[:64], "must not contain NUL characters"
                pending.append((name[:64], member, depth + 1))
        elif isinstance(item, list):
            pending.extend((f"{path}[{i}]", member, depth + 1) for i, member in enumerate(item))
    return None


def check_json_body(body: bytes) -> None:
    """400 naming the field for a body that is not JSON or holds what no route may take."""
    try:
        value = msgspec.json.decode(body)
    except UnicodeDecodeError:
        raise invalid("body", "is not valid UTF-8") from None
    except RecursionError:
        raise invalid("body", f"is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except msgspec.ValidationError:  # msgspec's only one here: a number beyond a double's range
        raise invalid("body", "holds a number out of range") from None
    except msgspec.DecodeError as exc:
        raise invalid("body", str(exc)) from None
    problem = _json_problem(value)
    if problem:
        raise invalid(*problem)


async def check_request_input(request: Request[Any, Any, Any]) -> None:
    """Every route's first step (litestar's ``before_request``, after its guards): the path,
    the query and a JSON body checked for what no route accepts."""
    _check_path(request.scope["path"])
    _check_query(request.scope.get("query_string", b""))
    if "data" in request.route_handler.parsed_fn_signature.parameters:
        body = await request.body()
        if body:
            check_json_body(body)
