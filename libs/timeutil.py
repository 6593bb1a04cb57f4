"""Small time helpers shared by the services' views."""

from __future__ import annotations

import math
from datetime import datetime


def days_remaining(ends: datetime, now: datetime) -> int:
    """Whole days left until ``ends``, counting a started day as one; never negative."""
    return max(0, math.ceil((ends - now).total_seconds() / 86400))
