"""The customer's own events, as the control plane's log stores them, for the export archive.

The instance asks billing (``GET <USAGE_URL>/api/instances/<customer>/events``) with the token
it reports usage with: the same credential, useless for any other customer. The answer is JSON
lines, one stored event a line, read into a spooled file as it comes (bounded memory), and
a last line with their count: an answer cut short (the control plane restarted midway) is
refused, and the export says the events are missing rather than holding some of them.
"""

from __future__ import annotations

import json
import tempfile
from typing import IO

import httpx

from libs.observability.telemetry import traced_hooks
from services.instance.export import SPOOL_BYTES, Spooled
from services.instance.settings import InstanceSettings


class EventsUnavailable(Exception):
    """The control plane did not give the customer's events; the reason."""


def events_url(settings: InstanceSettings) -> str:
    """Where the customer's events are read."""
    base = (settings.usage_url or settings.control_plane_url).rstrip("/")
    return f"{base}/api/instances/{settings.instance_customer_id}/events"


async def fetch_customer_events(settings: InstanceSettings, timeout: float = 300) -> Spooled:
    """The customer's events as JSON lines (spooled); ``EventsUnavailable`` saying why not."""
    if not settings.usage_token:
        raise EventsUnavailable("this instance has no usage token to ask the control plane with")
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as raw:
        try:
            async with (
                httpx.AsyncClient(timeout=timeout, event_hooks=traced_hooks()) as client,
                client.stream(
                    "GET",
                    events_url(settings),
                    headers={"Authorization": f"Bearer {settings.usage_token}"},
                ) as answer,
            ):
                if answer.status_code != 200:
                    raise EventsUnavailable(f"the control plane answered {answer.status_code}")
                async for chunk in answer.aiter_bytes():
                    raw.write(chunk)
        except httpx.HTTPError as exc:
            why = f"the control plane did not answer ({type(exc).__name__})"
            raise EventsUnavailable(why) from None
        raw.seek(0)
        return _whole(raw)


def _whole(raw: IO[bytes]) -> Spooled:
    """The event lines of an answer that ends with its count (the control plane's last
    line); ``EventsUnavailable`` for one cut short."""
    out = Spooled()
    end: object = None
    for line in raw:
        if end is not None:
            raise EventsUnavailable("the control plane's answer goes on after its end")
        if line.startswith(b'{"end"'):
            end = json.loads(line).get("end")
            continue
        out.write(line)
        out.rows += 1
    if not isinstance(end, dict) or end.get("events") != out.rows:
        out.body.close()
        raise EventsUnavailable("the control plane's answer was cut short")
    return out
