"""The counters ingest keeps (Prometheus): messages received, readings stored, repeated and
rejected by reason."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter


class IngestMetrics:
    """Readings received, stored and rejected (by reason) since the instance started."""

    def __init__(self, registry: CollectorRegistry) -> None:
        """Registers the counters."""
        self.messages = PromCounter(
            "iotistic_instance_mqtt_messages_total", "MQTT messages received", registry=registry
        )
        self.stored = PromCounter(
            "iotistic_instance_readings_stored_total", "Readings stored", registry=registry
        )
        self.repeated = PromCounter(
            "iotistic_instance_readings_repeated_total",
            "Readings received again (redelivered or published twice) and not stored again",
            registry=registry,
        )
        self.rejected = PromCounter(
            "iotistic_instance_readings_rejected_total",
            "Readings not stored, by reason",
            ["reason"],
            registry=registry,
        )
