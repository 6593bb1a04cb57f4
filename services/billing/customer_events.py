"""A customer's own events, as the log stores them, for their instance's export archive.

The instance asks with the token it reports usage with (``usage.check_instance``): it gets its
own customer's events and nobody else's. The events are read from the log itself (not from a
read model): every event keyed by the customer (``<prefix>.<Type>.<customer id>``) and their
``CustomerSignedUp``, which is keyed by the hash of the email (the first signup on an address
wins it) and told by its envelope's customer id. Each goes out as one JSON line, as stored:
``{"seq": ..., "subject": ..., "event": <the stored envelope>}``, in the log's order, and a
last line ``{"end": {"events": <how many>, "through_seq": ...}}`` that only a whole answer has.

Reading goes through a consumer of billing's own name (``READER``), the only kind the bus lets
a service create; one read at a time uses it (``lock``), so exports wait their turn.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from contracts import CustomerSignedUp
from contracts.envelope import decode_envelope
from contracts.errors import MalformedEvent
from libs.eventlog.reader import StoredMessage
from libs.eventlog.store import EventStore
from libs.projections.runner import durable_name

READER = "customer_events"
SERVICE = "billing"


def event_line(stored: StoredMessage) -> bytes:
    """One stored event as a JSON line: the envelope as stored when it is JSON (it always is,
    from our services), else its text."""
    head = json.dumps({"seq": stored.seq, "subject": stored.subject})[:-1]
    try:
        json.loads(stored.data)
        body = stored.data.replace(b"\n", b" ")
    except ValueError:
        body = json.dumps(stored.data.decode(errors="replace")).encode()
    return head.encode() + b', "event": ' + body + b"}\n"


def _signed_up_by(stored: StoredMessage, customer_id: str) -> bool:
    try:
        return decode_envelope(stored.data).customer_id == customer_id
    except MalformedEvent:
        return False


async def customer_events(
    store: EventStore, customer_id: str, lock: asyncio.Lock
) -> AsyncIterator[bytes]:
    """The customer's events, oldest first, each a JSON line."""
    name = durable_name(SERVICE, READER)
    async with lock:
        end = await store.last_seq()
        # Their signup: one event of all signups (a small list; JetStream cannot filter on
        # an envelope's field, and its filters may not overlap the customer's subjects).
        signups = [
            m
            async for m in store.read(
                to_seq=end,
                filters=[f"{store.prefix}.{CustomerSignedUp.TYPE}.*"],
                consumer_name=name,
            )
            if _signed_up_by(m, customer_id)
        ]
        own = store.read(
            to_seq=end, filters=[store.customer_filter(customer_id)], consumer_name=name
        )
        count = 0
        async for stored in own:
            while signups and signups[0].seq < stored.seq:
                count += 1
                yield event_line(signups.pop(0))
            count += 1
            yield event_line(stored)
        for stored in signups:
            count += 1
            yield event_line(stored)
    # Last: how many, so that an answer cut short is told from a whole one.
    yield json.dumps({"end": {"events": count, "through_seq": end}}).encode() + b"\n"
