"""Argument types the command groups share: whole numbers that may not be negative, or zero."""

from __future__ import annotations

import argparse


def count(text: str) -> int:
    """A whole number, 0 or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def positive(text: str) -> int:
    """A whole number, 1 or more."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1")
    return value


# argparse names the type in its refusal of a non-number ("invalid _count value: 'x'"): the
# names it showed before these moved here are kept, so the command's output is unchanged.
count.__name__ = "_count"
positive.__name__ = "_positive"
