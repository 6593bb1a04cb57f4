"""Iotistic's event contracts: the envelope on the log and one msgspec Struct per event.

Every service imports events from here and nowhere else; ``contracts.schema`` exports their
JSON Schemas and checks that a change keeps old events readable.
"""

from contracts.envelope import (
    Envelope,
    TraceContext,
    decode_envelope,
    decode_event,
    encode_envelope,
    new_envelope,
)
from contracts.errors import MalformedEvent, UnknownEventType
from contracts.events import (
    EVENT_TYPES,
    CustomerClosed,
    CustomerSignedUp,
    DeploymentFailed,
    DeploymentProgressed,
    DeploymentRequested,
    DeploymentStarted,
    DeploymentSucceeded,
    Event,
    Features,
    LicenseIssued,
    LicenseRevoked,
    Limits,
    PaymentFailed,
    Plan,
    StripeEventReceived,
    SubscriptionActivated,
    SubscriptionCanceled,
    SubscriptionChanged,
    TrialExpired,
    TrialStarted,
    UsageReported,
    event_type,
)

__all__ = [
    "EVENT_TYPES",
    "CustomerClosed",
    "CustomerSignedUp",
    "DeploymentFailed",
    "DeploymentProgressed",
    "DeploymentRequested",
    "DeploymentStarted",
    "DeploymentSucceeded",
    "Envelope",
    "Event",
    "Features",
    "LicenseIssued",
    "LicenseRevoked",
    "Limits",
    "MalformedEvent",
    "PaymentFailed",
    "Plan",
    "StripeEventReceived",
    "SubscriptionActivated",
    "SubscriptionCanceled",
    "SubscriptionChanged",
    "TraceContext",
    "TrialExpired",
    "TrialStarted",
    "UnknownEventType",
    "UsageReported",
    "decode_envelope",
    "decode_event",
    "encode_envelope",
    "event_type",
    "new_envelope",
]
