"""Prometheus metrics of the plumbing, registered on a registry the process builds at start."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ProjectionMetrics:
    """Counters of what projections did with each event, and where they stand."""

    def __init__(self, registry: CollectorRegistry) -> None:
        """Register the projection metrics on ``registry``."""
        labels = ("service", "projection")
        self.events = Counter(
            "iotistic_projection_events_total",
            "Events a projection took from the log, by outcome (applied, duplicate, ignored)",
            (*labels, "outcome"),
            registry=registry,
        )
        self.parked_events = Counter(
            "iotistic_projection_parked_events_total",
            "Events a projection could not apply and parked for an operator",
            labels,
            registry=registry,
        )
        self.checkpoint = Gauge(
            "iotistic_projection_checkpoint",
            "Stream sequence of the last event the projection applied",
            labels,
            registry=registry,
        )
        self.pending = Gauge(
            "iotistic_projection_pending_events",
            "Events of the projection's types in the log it has not applied yet (its lag)",
            labels,
            registry=registry,
        )
        self.apply_seconds = Histogram(
            "iotistic_projection_apply_seconds",
            "Time to apply one event with its checkpoint in one transaction",
            labels,
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        )

    def record(self, service: str, projection: str, outcome: str, seq: int) -> None:
        """Count one event taken and move the checkpoint gauge."""
        self.events.labels(service, projection, outcome).inc()
        self.checkpoint.labels(service, projection).set(seq)

    def show_pending(self, service: str, projection: str, pending: int) -> None:
        """Set how many events the projection has still to apply (and make its parked
        counter exist at 0, so increase() counts its first parked event)."""
        self.pending.labels(service, projection).set(pending)
        self.parked_events.labels(service, projection)

    def parked(self, service: str, projection: str) -> None:
        """Count one parked event."""
        self.parked_events.labels(service, projection).inc()

    def observe_apply(self, service: str, projection: str, seconds: float) -> None:
        """Record how long one apply transaction took."""
        self.apply_seconds.labels(service, projection).observe(seconds)
