"""Reading the log back in order, through a short-lived consumer that moves no one's position.

``EventStore.read`` is built on ``LogReader``: an ephemeral JetStream consumer without acks that
starts at a given sequence, and a check that every delivery follows the one before it, because
that consumer never redelivers what was lost on the way. A bounded read ends once the consumer
has nothing left to deliver, never on a timeout alone (a slow server looks the same).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from libs.eventlog.errors import EventStoreError

log = logging.getLogger(__name__)

# Fetch timeouts in a row, with the consumer still owing events, before a read gives up.
_READ_STALL_CHECKS = 40


@dataclass(frozen=True)
class StoredMessage:
    """A message read back from the log, not yet decoded (it may be malformed)."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]

    @property
    def event_type(self) -> str:
        """The event type its subject names (``<prefix>.<EventType>.<key>``)."""
        parts = self.subject.rsplit(".", 2)
        return parts[-2] if len(parts) == 3 else ""


@dataclass
class ReadPosition:
    """How far a read covered the log: every matching event through ``through`` was yielded."""

    through: int = 0


def to_stored(msg: Msg) -> StoredMessage:
    """The parts of a JetStream message a projection or reader needs."""
    meta = msg.metadata
    return StoredMessage(
        seq=int(meta.sequence.stream),
        subject=msg.subject,
        data=msg.data,
        headers=dict(msg.headers or {}),
    )


class LogReader:
    """One read of the log: ``filters`` from a start sequence, ``batch`` events per fetch."""

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        filters: list[str],
        batch: int = 500,
        name: str | None = None,
    ) -> None:
        """Read ``stream`` over ``js``, only the subjects matching ``filters``; through a
        consumer called ``name`` when given (one the bus lets the reader create), else one with
        a name the client makes up (which only the operator's tools may create)."""
        self._js = js
        self.stream = stream
        self.filters = filters
        self.batch = batch
        self.name = name

    def consumer_config(self, from_seq: int) -> api.ConsumerConfig:
        """The ephemeral consumer of a read: no acks, in memory, gone a minute after use."""
        return api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(from_seq, 1),
            ack_policy=api.AckPolicy.NONE,
            filter_subjects=self.filters,
            inactive_threshold=60.0,
            max_waiting=1,
            mem_storage=True,
        )

    async def read(
        self, from_seq: int, end: int | None, *, follow: bool, position: ReadPosition
    ) -> AsyncGenerator[StoredMessage, None]:
        """Yield the messages from ``from_seq`` through ``end`` (for ever while ``follow``),
        keeping ``position`` up to date with how far the read covered the log."""
        if end is not None and end < from_seq:
            position.through = end
            return
        sub = await self._subscribe(from_seq)
        received = 0  # consumer sequence of the last delivery received
        stalls = 0
        try:
            while True:
                msgs = await self._fetch(sub)
                if not msgs:
                    stalls += 1
                    if (
                        not follow
                        and end is not None
                        and await self._read_is_complete(sub, received, stalls)
                    ):
                        position.through = end
                        return
                    continue
                stalls = 0
                for msg in msgs:
                    received = self._next_delivery(msg, received)
                    stored = to_stored(msg)
                    if end is not None and stored.seq > end:
                        position.through = end
                        return
                    yield stored
                    position.through = stored.seq
                    if end is not None and stored.seq >= end:
                        return
                if not follow and end is not None and msgs[-1].metadata.num_pending == 0:
                    position.through = end
                    return
        finally:
            try:
                await sub.unsubscribe()
                if self.name is not None:
                    # Gone now, not a minute later: the next read may use the name.
                    await self._js.delete_consumer(self.stream, self.name)
            except (nats.errors.Error, nats.js.errors.Error):
                log.debug("reader unsubscribe failed", exc_info=True)

    async def _subscribe(self, from_seq: int) -> JetStreamContext.PullSubscription:
        config = self.consumer_config(from_seq)
        if self.name is None:
            return await self._js.pull_subscribe("", stream=self.stream, config=config)
        config.name = self.name
        await self._js.add_consumer(self.stream, config=config)
        return await self._js.pull_subscribe_bind(stream=self.stream, name=self.name)

    async def _fetch(self, sub: JetStreamContext.PullSubscription) -> list[Msg]:
        """The next deliveries, or none when the fetch timed out."""
        try:
            # Short waits: a batch fetch lingers until full or timed out (see the runner).
            msgs: list[Msg] = await sub.fetch(self.batch, timeout=0.25)
        except (nats.errors.TimeoutError, TimeoutError):
            return []
        return msgs

    def _next_delivery(self, msg: Msg, received: int) -> int:
        """The delivery's consumer sequence, which must follow ``received`` without a gap."""
        delivered = int(msg.metadata.sequence.consumer)
        if delivered != received + 1:
            # The reader's consumer never redelivers (no acks): what was skipped is gone.
            raise EventStoreError(
                f"read of {self.stream}: delivery {received + 1} was lost "
                f"(got {delivered}, stream seq {msg.metadata.sequence.stream})"
            )
        return delivered

    async def _read_is_complete(
        self, sub: JetStreamContext.PullSubscription, received: int, stalls: int
    ) -> bool:
        """After a fetch timed out: True when the reader's consumer has nothing left to deliver
        and all it delivered arrived. A timeout alone says nothing about the end of the log (a
        slow server or network looks the same)."""
        try:
            info = await sub.consumer_info()
        except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as exc:
            raise EventStoreError(f"read of {self.stream} lost its consumer: {exc!r}") from exc
        delivered = int((info.delivered.consumer_seq or 0) if info.delivered else 0)
        # Deliveries sent before the timeout may still be on their way: the next fetch takes them.
        if not info.num_pending and delivered <= received:
            return True
        if stalls >= _READ_STALL_CHECKS:
            raise EventStoreError(
                f"read of {self.stream} stalled: {info.num_pending} events not delivered, "
                f"{delivered - received} delivered but not received"
            )
        return False
