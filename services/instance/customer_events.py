"""The customer's own events, as the control plane's log stores them, for the export archive.

The instance asks billing (``GET <USAGE_URL>/api/instances/<customer>/events``) with the token
it reports usage with: the same credential, useless for any other customer. The answer is JSON
lines, one stored event a line, read into a spooled file as it comes (bounded memory).
"""

from __future__ import annotations

import httpx

from services.instance.export import Spooled
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
    out = Spooled()
    try:
        async with (
            httpx.AsyncClient(timeout=timeout) as client,
            client.stream(
                "GET",
                events_url(settings),
                headers={"Authorization": f"Bearer {settings.usage_token}"},
            ) as answer,
        ):
            if answer.status_code != 200:
                raise EventsUnavailable(f"the control plane answered {answer.status_code}")
            async for chunk in answer.aiter_bytes():
                out.write(chunk)
    except httpx.HTTPError as exc:
        out.body.close()
        why = f"the control plane did not answer ({type(exc).__name__})"
        raise EventsUnavailable(why) from None
    out.body.seek(0)
    out.rows = sum(1 for line in out.body if line.strip())
    out.body.seek(0, 2)
    return out
