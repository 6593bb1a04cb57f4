"""A device's status message on ``<customer>/devices/<device_id>/status``.

Either a plain string, ``online`` or ``offline`` (taken as before: anything but ``offline``, in
any case and optionally quoted, means online), or a JSON object
``{"state": "online"|"offline", "firmware": "<version>"}``: ``firmware`` is optional, 1 to
``FIRMWARE_LIMIT`` printable ASCII characters, and other keys are ignored. A payload that starts
with ``{`` is a JSON status; one that is malformed or invalid is refused with the reason, to be
dead-lettered, and changes nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from services.instance.ingest_batch import Batch

MAX_STATUS = 4096
FIRMWARE_LIMIT = 64


class Status(msgspec.Struct, frozen=True, kw_only=True):
    """A JSON status (unknown keys are ignored, so devices may send more)."""

    state: Literal["online", "offline"]
    firmware: (
        Annotated[str, Meta(min_length=1, max_length=FIRMWARE_LIMIT, pattern=r"^[\x20-\x7e]+$")]
        | None
    ) = None


DECODER = msgspec.json.Decoder(Status)


def parse_status(payload: bytes) -> Status:
    """The status a payload states; ``ValueError`` with the reason when it is a JSON status
    that cannot be taken."""
    text = payload.strip()
    if not text.startswith(b"{"):
        state = payload.decode(errors="replace").strip().strip('"').lower()
        return Status(state="offline" if state == "offline" else "online")
    if len(payload) > MAX_STATUS:
        raise ValueError(f"status oversized: {len(payload)} bytes (at most {MAX_STATUS})")
    try:
        return DECODER.decode(text)
    except msgspec.ValidationError as exc:
        raise ValueError(f"status invalid: {_explained(exc)}") from None
    except msgspec.DecodeError as exc:
        raise ValueError(f"status malformed: {exc}") from None


def _explained(exc: msgspec.ValidationError) -> str:
    """msgspec's message, with the firmware's limits said in words."""
    message = str(exc)
    if message.endswith("`$.firmware`") and "str" in message:
        return f"firmware must be 1 to {FIRMWARE_LIMIT} printable ASCII characters ({message})"
    return message


def take_status(batch: Batch, device_id: str, payload: bytes, now: datetime) -> str | None:
    """Buffer the device's state (and firmware, if it said one) in ``batch``; or, changing
    nothing, return why the status is refused."""
    try:
        status = parse_status(payload)
    except ValueError as exc:
        return str(exc)
    batch.seen[device_id] = (now, status.state)
    if status.firmware is not None:
        batch.firmware[device_id] = (now, status.firmware)
    return None
