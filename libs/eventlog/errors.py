"""What the event log raises: a log that is away, an append it refused, a race lost.

Only ``EventStoreError`` and its ``AppendRefused`` are transient (the same append may succeed
later); ``ConcurrencyConflict`` is final: another writer appended first.
"""

from __future__ import annotations


class EventStoreError(RuntimeError):
    """The log could not take or give an event (connection, timeout, stream missing).

    Transient: the same append may succeed later.
    """


class AppendRefused(EventStoreError):
    """The log certainly did not store the event: the connection was down before it was sent,
    or the server answered with an error (a full stream or disk, a refused permission).

    A caller may undo what it prepared for the event; a plain ``EventStoreError`` from an
    append (a timeout, a connection lost after sending) leaves it unknown whether the event was
    stored, and the caller must keep what a later retry needs to find the first outcome.
    """


class ConcurrencyConflict(Exception):
    """Another writer appended to the subject first; the caller lost the race (final).

    ``last_seq`` is the sequence the server found instead of the one expected, when it said.
    """

    def __init__(self, subject: str, last_seq: int | None = None) -> None:
        super().__init__(f"another event was appended to {subject} first")
        self.subject = subject
        self.last_seq = last_seq
