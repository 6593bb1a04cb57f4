"""Why an event on the log cannot be read.

These live apart from ``envelope`` and ``events`` so both can raise them without importing
each other.
"""

from __future__ import annotations


class MalformedEvent(ValueError):
    """An event that cannot be read: bad JSON, a missing field, or a body of the wrong shape.

    Consumers park such an event with this reason instead of dropping it, so the message is
    written for the operator who will read it.
    """


class UnknownEventType(MalformedEvent):
    """An envelope whose ``type`` this code does not know (a newer producer, or a typo).

    A subclass of ``MalformedEvent`` so one ``except`` parks both; catch it on its own to
    skip events that a newer service emits and this one has no use for.
    """
