"""What a replay or a verify reports: events applied, rows that differ, projections behind.

``iotistic replay`` prints these, and ``ReplayError`` is what it says when a rebuild cannot be
done as asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ReplayError(RuntimeError):
    """The rebuild could not be done as asked: an event it could not apply that the live
    projection did not skip, a log it could not read to the end, or a partial rebuild that
    would replace the live read models."""


@dataclass
class TableDiff:
    """Rows of one table that differ between the live and the rebuilt read model."""

    table: str
    projection: str = ""
    only_live: list[dict[str, Any]] = field(default_factory=list)
    only_rebuilt: list[dict[str, Any]] = field(default_factory=list)
    changed: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """True when the table is the same in both."""
        return not (self.only_live or self.only_rebuilt or self.changed)


@dataclass
class ProjectionCheck:
    """Where one live projection stood against the head of the log when it was verified.

    ``lag`` counts the events of the projection's own types after its checkpoint, up to the
    head: a projection whose last event is older than the head is at the head with lag 0.
    ``moved`` says whether its checkpoint advanced while verify waited for it: a projection
    behind the head that did not move is stalled (its runner dead or blocked), not just slow.
    """

    projection: str
    checkpoint: int
    head: int
    lag: int
    moved: bool
    differences: int = 0
    parked_at: int | None = None

    @property
    def state(self) -> str:
        """``at head``; else ``blocked`` (at a parked event, for the operator to decide),
        ``behind`` (it moved while verify waited) or ``stalled``."""
        if self.lag == 0:
            return "at head"
        if self.parked_at is not None:
            return "blocked"
        return "behind" if self.moved else "stalled"


@dataclass
class ReplayReport:
    """What a rebuild did: events read and applied, up to which sequence, and any differences.

    A verify also records the head of the log it measured against and, per projection, its
    checkpoint and lag (``checks``).
    """

    service: str
    events_read: int = 0
    events_applied: int = 0
    upto_seq: int = 0
    diffs: list[TableDiff] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    head: int = 0
    checks: list[ProjectionCheck] = field(default_factory=list)

    @property
    def differences(self) -> int:
        """Number of differing rows across all tables."""
        return sum(len(d.only_live) + len(d.only_rebuilt) + len(d.changed) for d in self.diffs)

    def lagging(self, max_lag: int = 0) -> list[ProjectionCheck]:
        """The projections more than ``max_lag`` of their events behind the head."""
        return [c for c in self.checks if c.lag > max_lag]
