"""How ingest takes one MQTT message into its buffer: a native reading or status on
``<customer>/devices/<device_id>/...``, or a fleet device's batch, heartbeat or configuration
report on ``iot/device/<uuid>/...`` (the original agent's wire format). Each message becomes rows
(within the license's daily budget and burst allowance, unless the license is read-only, with
the temperature offset the platform applies for the device), a device's status, a report, or
dead letters with their reasons; its packet id is kept to be acknowledged with the batch.
Messages of devices not known yet wait in ``Batch.unknown`` for ``Ingest`` to look them up
again.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, date, datetime, timedelta

from services.instance import fleet
from services.instance.config_reports import TemperatureOffsets, parse_report
from services.instance.dead_letters import DEAD_LETTER_PAYLOAD
from services.instance.ingest_batch import Batch
from services.instance.ingest_metrics import IngestMetrics
from services.instance.license import LicenseHolder
from services.instance.original_format import Refused, parse_sensor_message, topic_kind
from services.instance.quotas import BURST, DAILY_BUDGET, TokenBucket, note_refused
from services.instance.readings import Reading, Rejected, parse_reading, record
from services.instance.settings import InstanceSettings
from services.instance.status import take_status

log = logging.getLogger(__name__)
# The refused messages of one batch kept each as its own dead letter; the rest are one more (a
# batch of a thousand bad messages would otherwise be a thousand dead letters buffered and
# stored for one MQTT message).
MAX_REFUSED_KEPT = 20


class Intake:
    """The taking side of ingest: what arrives becomes the buffered batch."""

    def __init__(
        self, settings: InstanceSettings, license: LicenseHolder, metrics: IngestMetrics
    ) -> None:
        """No devices known until they are loaded (``Ingest.load_usage``)."""
        self._settings = settings
        self._license = license
        self._metrics = metrics
        self._batch = Batch()
        self._known_devices: set[str] = set()
        # The fleet devices (original wire format, under iot/device/<uuid>/): device id by uuid.
        self._fleet: dict[str, str] = {}
        self._offsets = TemperatureOffsets()
        # Set when the batch is full enough to write at once.
        self._full = asyncio.Event()
        # Set whenever something is buffered: an idle writer sleeps until then.
        self._arrived = asyncio.Event()
        self.today: date = datetime.now(UTC).date()
        self.accepted_today = 0
        # The readings' burst allowance (``quotas``): made at the first reading, from the
        # license then held and the level saved before a restart (``saved_bucket``).
        self.bucket: TokenBucket | None = None
        self.saved_bucket: tuple[float, datetime] | None = None

    @property
    def root(self) -> str:
        """``<customer_id>/devices``."""
        return f"{self._settings.instance_customer_id}/devices"

    def _take_safely(
        self, topic: str, payload: bytes, now: datetime, packet_id: int, looked_up: bool = False
    ) -> None:
        """``_take``, except that a message this code cannot handle becomes a dead letter (and
        is acknowledged with its batch) instead of stopping ingest."""
        acks = len(self._batch.acks)
        try:
            self._take(topic, payload, now, packet_id, looked_up)
        except Exception as exc:
            log.exception("ingest: could not take a message on %s", topic[:200])
            self._reject(topic, None, f"internal error: {type(exc).__name__}", payload, now)
            if packet_id and len(self._batch.acks) == acks:
                self._batch.acks.append(packet_id)

    def _take(
        self, topic: str, payload: bytes, now: datetime, packet_id: int, looked_up: bool = False
    ) -> None:
        if topic.startswith(f"{fleet.ROOT}/"):
            return self._take_fleet(topic, payload, now, packet_id, looked_up)
        batch = self._batch
        parts = topic.split("/")
        known = len(parts) == 4 and parts[2] in self._known_devices
        if len(parts) == 4 and not known and not looked_up:
            batch.unknown.append((topic, payload, now, packet_id))  # see _settle_unknown
            return None
        self._count(packet_id)
        if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != self.root:
            return self._reject(topic, None, "unknown topic", payload, now)
        device_id, kind = parts[2], parts[3]
        if not known:
            return self._reject(topic, device_id, "unknown device", payload, now)
        if kind == "status":
            reason = take_status(batch, device_id, payload, now)
            return self._reject(topic, device_id, reason, payload, now) if reason else None
        if self._license.read_only(now):
            return self._reject(
                topic, device_id, "read-only: the license has expired", payload, now
            )
        try:
            ts, reading = parse_reading(payload, now, now - timedelta(days=self._retention()))
        except Rejected as exc:
            return self._reject(topic, device_id, str(exc), payload, now)
        return self._accept(device_id, ts, reading, now)

    def _take_fleet(
        self, topic: str, payload: bytes, now: datetime, packet_id: int, looked_up: bool
    ) -> None:
        """A message on a fleet device's topic, in the original agent's wire format."""
        uuid, kind = fleet.uuid_of(topic), topic_kind(topic)
        if kind == "config":  # the instance's own retained publish: nothing to take
            return self._count(packet_id, message=False)
        device_id = self._fleet.get(uuid) if uuid is not None else None
        if device_id is None and uuid is not None and not looked_up:
            self._batch.unknown.append((topic, payload, now, packet_id))  # see _settle_unknown
            return None
        self._count(packet_id)
        if device_id is None:
            return self._reject(topic, None, "unknown device", payload, now)
        if kind == "reported":
            try:
                report = parse_report(payload)
            except ValueError as exc:
                return self._reject(topic, device_id, str(exc), payload, now)
            self._batch.reports[device_id] = (now, report)
            self._offsets.reported(device_id, report.temperature_offset)
            return None
        if kind != "sensor":
            return self._reject(topic, device_id, "unknown topic", payload, now)
        parsed = parse_sensor_message(payload, now, now - timedelta(days=self._retention()))
        if parsed.heartbeat:
            self._batch.seen[device_id] = (now, "online")
        refused = list(parsed.refused)
        if parsed.readings and self._license.read_only(now):
            refused += [
                Refused(
                    m.index, f"read-only: message {m.index}: the license has expired", m.payload
                )
                for m in parsed.readings
            ]
        else:
            for message in parsed.readings:
                self._accept(device_id, message.ts, message.reading, now)
        refused.sort(key=lambda one: -1 if one.index is None else one.index)
        self._reject_messages(topic, device_id, refused, payload, now)
        return None

    def _reject_messages(
        self, topic: str, device_id: str, refused: list[Refused], payload: bytes, now: datetime
    ) -> None:
        """The refused messages of one batch: each its own dead letter up to
        ``MAX_REFUSED_KEPT``, then one for the rest (how many, which, the first's reason, the
        batch as payload); every one counted."""
        for one in refused[:MAX_REFUSED_KEPT]:
            self._reject(topic, device_id, one.reason, one.payload, now)
        rest = refused[MAX_REFUSED_KEPT:]
        if not rest:
            return
        kind = rest[0].reason.partition(":")[0]
        reason = (
            f"{kind}: messages {rest[0].index} to {rest[-1].index}: {len(rest)} more refused "
            f"messages of this batch, not kept one by one (the first: {rest[0].reason})"
        )
        self._reject(topic, device_id, reason, payload, now)
        self._batch.usage["rejected_readings"] += len(rest) - 1

    def _count(self, packet_id: int, message: bool = True) -> None:
        """One message taken: acknowledged with its batch, and counted (``message``)."""
        if packet_id:
            self._batch.acks.append(packet_id)
            if len(self._batch.acks) >= self._settings.ingest_batch_rows:
                self._full.set()
        if message:
            self._batch.usage["messages"] += 1

    def _accept(self, device_id: str, ts: datetime, reading: Reading, now: datetime) -> None:
        """Buffer a valid reading as a row, within the day's quota (with the temperature
        offset the platform applies for the device)."""
        batch = self._batch
        self._roll_day(now)
        quota = self._quota()
        bucket = self._bucket(quota, now)
        if self.accepted_today >= quota:
            return self._over_quota(DAILY_BUDGET, device_id, now, quota)
        if not bucket.take(now):
            return self._over_quota(BURST, device_id, now, quota)
        self.accepted_today += 1
        batch.rows.append(record(device_id, ts, reading, self._offsets.applied(device_id)))
        if len(batch.rows) >= self._settings.ingest_batch_rows:
            self._full.set()
        batch.seen[device_id] = (now, "online")

    def _bucket(self, quota: int, now: datetime) -> TokenBucket:
        """The bucket, shaped for ``quota`` (and made, from its saved level if any)."""
        if self.bucket is None:
            self.bucket = TokenBucket.full(quota, now)
            if self.saved_bucket is not None:
                self.restore_bucket(*self.saved_bucket)
        self.bucket.reshape(quota)
        return self.bucket

    def restore_bucket(self, level: float, at: datetime) -> None:
        """Continue from the level saved before a restart (refilled since)."""
        self.saved_bucket = (level, at)
        if self.bucket is not None:
            self.bucket.level, self.bucket.at = min(level, self.bucket.capacity), at

    def _over_quota(self, meter: str, device_id: str, now: datetime, quota: int) -> None:
        """A reading a limit refused: counted, and recorded per device and minute."""
        self._batch.usage["over_quota_readings"] += 1
        note_refused(self._batch.refused, meter, device_id, now, quota, "readings")

    def refused(self, meter: str, now: datetime, quota: int, what: str) -> None:
        """Something a limit refused outside ingest (an API request, a device registration),
        recorded with the next batch."""
        note_refused(self._batch.refused, meter, None, now, quota, what)
        self._arrived.set()

    def _reject(
        self, topic: str, device_id: str | None, reason: str, payload: bytes, now: datetime
    ) -> None:
        self._batch.dead.append(
            (now, topic[:512], device_id, reason[:500], payload[:DEAD_LETTER_PAYLOAD])
        )
        self._batch.usage["rejected_readings"] += 1
        self._metrics.rejected.labels(reason.split(":")[0]).inc()

    def _retention(self) -> int:
        claims = self._license.claims
        return claims.features.dataRetentionDays if claims is not None else 1

    def _quota(self) -> int:
        claims = self._license.claims
        return claims.limits.mqttMessagesPerDay if claims is not None else 0

    def _roll_day(self, now: datetime) -> None:
        if now.date() != self.today:
            self.today, self.accepted_today = now.date(), 0

    def _is_known(self, topic: str) -> bool:
        """Whether the device that published on ``topic`` is known (by id, or by uuid)."""
        key = topic.split("/")[2]
        return key in (self._fleet if topic.startswith(f"{fleet.ROOT}/") else self._known_devices)

    def count_api_request(self) -> None:
        """One more API request today, written with the next batch."""
        self._batch.usage["api_requests"] += 1
        self._arrived.set()

    def know_device(self, device_id: str) -> None:
        """A device registered just now may publish at once."""
        self._known_devices.add(device_id)

    def know_fleet_device(self, device_id: str, uuid: str) -> None:
        """A fleet device registered just now may publish at once, under its uuid."""
        self._fleet[uuid] = device_id

    def forget_device(self, device_id: str) -> None:
        """A deleted device's messages are refused from now on."""
        self._known_devices.discard(device_id)
        self._fleet = {u: d for u, d in self._fleet.items() if d != device_id}
        self._offsets.forget(device_id)

    def config_changed(self, device_id: str) -> None:
        """A device's desired configuration changed: its temperature offset is loaded again
        before the next batch is written (readings taken from then on use it)."""
        self._offsets.mark_stale()
        self._arrived.set()
