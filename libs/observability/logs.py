"""Logging for every process: one line per record, whatever a client put in it.

Log messages carry what clients send (paths, ids, values in error messages). A CR, LF or NUL
among them would start a line of the attacker's choosing, a forged record for whoever reads the
log. Every record is therefore escaped where it is made, by a log record factory: control
characters in the message, its arguments and its exception's message become visible escapes
(``\\n``, ``\\x00``, ``\\u2028``), and a traceback keeps only its own line breaks. A factory, not
a formatter, because uvicorn installs handlers and formatters of its own when its server is
configured, after ours; a record escaped at birth reads the same through any of them.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator
from types import TracebackType
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# C0 controls (CR, LF, NUL, ESC, ...), DEL, the C1 controls (NEL among them) and the Unicode
# line and paragraph separators: everything a terminal or a log viewer may take as a line break
# or a command.
CONTROL_CHARACTERS = frozenset(
    [*range(0x00, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029],
)
_NAMED = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
_ESCAPES = {
    code: _NAMED.get(code, f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    for code in CONTROL_CHARACTERS
}

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def escape_control(text: str) -> str:
    """``text`` with each control character written as a visible escape (``\\n``, ``\\x00``)."""
    return text.translate(_ESCAPES)


def format_exception(exc_info: ExcInfo) -> str:
    """A traceback as the standard one, but each exception's message on one escaped line."""
    exception = traceback.TracebackException(*exc_info, compact=True)
    return "".join(_traceback_lines(exception)).rstrip("\n")


def _traceback_lines(exception: traceback.TracebackException) -> Iterator[str]:
    # The frames are our own source; only the messages carry what came from outside.
    if exception.__cause__ is not None:
        yield from _traceback_lines(exception.__cause__)
        yield "\nThe above exception was the direct cause of the following exception:\n\n"
    elif exception.__context__ is not None and not exception.__suppress_context__:
        yield from _traceback_lines(exception.__context__)
        yield "\nDuring handling of the above exception, another exception occurred:\n\n"
    if exception.stack:
        yield "Traceback (most recent call last):\n"
        yield from exception.stack.format()
    yield escape_control("".join(exception.format_exception_only()).rstrip("\n")) + "\n"
    for number, member in enumerate(exception.exceptions or [], 1):
        yield f"sub-exception {number}:\n"
        yield from _traceback_lines(member)


class _Escaped:
    """An argument of a log message, rendered escaped by ``%s`` and ``%r`` alike."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return escape_control(str(self.value))

    def __repr__(self) -> str:
        return escape_control(repr(self.value))


def _escaped_argument(value: object) -> object:
    if value is None or isinstance(value, int | float):  # bool is an int; %d and %f need these
        return value
    return _Escaped(value)


def _escaped_record_factory(make: Any) -> Any:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record: logging.LogRecord = make(*args, **kwargs)
        if isinstance(record.msg, str):
            record.msg = escape_control(record.msg)
        else:
            record.msg = _Escaped(record.msg)
        # The arguments stay separate (uvicorn's access formatter unpacks them), each escaped.
        if isinstance(record.args, tuple):
            record.args = tuple(_escaped_argument(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _escaped_argument(v) for k, v in record.args.items()}
        if record.exc_info and record.exc_info[1] is not None:
            # Formatters take exc_text as it is when it is set: ours, escaped, for all of them.
            try:
                record.exc_text = format_exception(record.exc_info)
            except Exception:  # noqa: BLE001 - a record must not be lost to its traceback
                text = "".join(traceback.format_exception(*record.exc_info))
                record.exc_text = escape_control(text.rstrip("\n"))
        return record

    factory.escapes_control = True  # type: ignore[attr-defined]
    return factory


def install_escaping() -> None:
    """Escape every log record made in this process from now on (once; idempotent)."""
    current = logging.getLogRecordFactory()
    if not getattr(current, "escapes_control", False):
        logging.setLogRecordFactory(_escaped_record_factory(current))


def configure_logging(level: str) -> None:
    """The process's logging: records on standard error, one escaped line each."""
    logging.basicConfig(level=level, format=FORMAT)
    install_escaping()
