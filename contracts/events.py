"""Every event on the log, one msgspec Struct each, and the table naming them.

Rules that keep old events readable for as long as the log keeps them:

- a field is only ever added, with a default, in a new ``VERSION`` (with a new example payload
  under ``tests/contracts/payloads`` and a new schema under ``contracts/schemas``);
- a field's type never changes, and no field becomes required;
- no event forbids unknown fields, so an older reader accepts a newer producer's event;
- secrets (passwords and their hashes, Stripe keys, private signing keys) are never fields.

``tests/contracts`` checks each of these. The body carries no ``type`` tag: the envelope names
the type, so the envelope can always be read even when its body's type is unknown here.

Longer than 400 lines because it is the catalogue of every contract in one place: a reader (or
a reviewer of a contract change) sees all events and their shared values together, and each
event is a short Struct with its docstring; split by service, the shared values would need a
home of their own and the table below would import from everywhere.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, ClassVar, Literal

from msgspec import Meta, Struct, field

from contracts.errors import UnknownEventType

Plan = Literal["trial", "starter", "professional", "enterprise"]

# msgspec checks constraints when decoding; ``new_envelope`` decodes what it wraps, so a
# producer learns of a broken event before any consumer has to park it.
UtcDateTime = Annotated[datetime, Meta(tz=True, description="RFC 3339 time with an offset")]
Id = Annotated[str, Meta(min_length=1)]
Count = Annotated[int, Meta(ge=0)]
Attempt = Annotated[int, Meta(ge=1, description="1 for the first try")]


class Event(Struct, frozen=True, kw_only=True):
    """Base of every event body: ``TYPE`` names it on the log, ``VERSION`` is its contract.

    Subclasses repeat ``frozen=True, kw_only=True`` because msgspec does not inherit
    ``kw_only``; keyword-only fields let a new version add a defaulted field anywhere.
    """

    TYPE: ClassVar[str]
    VERSION: ClassVar[int]


# --- shared values ------------------------------------------------------------------------------


class Features(Struct, frozen=True, kw_only=True, rename=None):
    """What a license switches on; the camelCase names are the license JWT's claim names."""

    maxDevices: Count
    dataRetentionDays: Count
    alerting: bool
    apiAccess: bool
    webhooks: bool


class Limits(Struct, frozen=True, kw_only=True, rename=None):
    """Daily quotas a license grants; the camelCase names are the license JWT's claim names."""

    mqttMessagesPerDay: Count
    apiRequestsPerDay: Count


# --- signup -------------------------------------------------------------------------------------


class PersonalData(Struct, frozen=True, kw_only=True):
    """The personal data of an event, as sealed into its ``sealed`` field (never on the log in
    the clear since the versions that carry ``sealed``): what a customer's erasure destroys."""

    email: str | None = None
    email_display: str | None = None
    company_name: str | None = None
    full_name: str | None = None
    # Why the customer closed the account, in their words (CustomerClosed): free text may
    # name anyone.
    reason: str | None = None


class SealedPersonalData(Struct, frozen=True, kw_only=True):
    """``PersonalData`` encrypted with the customer's data key (AES-256-GCM; the key is held
    outside the log, ``libs/sealing``). Erasing the customer destroys the key, so every copy
    of this, in the log and in its backups, can no longer be read. Associated data binds it to
    the event's type and customer: it cannot be moved into another customer's event."""

    key_id: Annotated[str, Meta(min_length=1, max_length=64, description="the data key's id")]
    algorithm: Literal["AES-256-GCM"] = "AES-256-GCM"
    nonce: Annotated[bytes, Meta(description="96 bits, base64")]
    ciphertext: Annotated[bytes, Meta(description="sealed PersonalData JSON with its tag, base64")]


class CustomerSignedUp(Event, frozen=True, kw_only=True):
    """A new account exists. Starts the trial, the license and the first deployment.

    Carries no password or hash: credentials stay in the signup service's private tables.
    Version 2 carries the personal data (email, email_display, company_name, full_name) only
    in ``sealed``; the plain fields are left out (null). Version 1 events carry them in the
    clear and stay readable as they are.
    """

    TYPE = "CustomerSignedUp"
    VERSION = 2

    customer_id: Id
    email: (
        Annotated[str, Meta(min_length=3, description="version 1 only: normalised, lower-case")]
        | None
    ) = None
    email_display: (
        Annotated[str, Meta(min_length=3, description="version 1 only: as the customer typed it")]
        | None
    ) = None
    company_name: str | None = None
    full_name: str | None = None
    plan: Plan = "starter"
    signed_up_at: UtcDateTime
    # Decided once, at signup: billing's trial and licensing's first license both end with it.
    trial_days: Annotated[int, Meta(ge=1, le=365)] = 14
    sealed: SealedPersonalData | None = None


class CustomerClosed(Event, frozen=True, kw_only=True):
    """An account is closed; its instance is torn down and its license revoked.

    Version 2 adds ``erase``: the customer asked for their data to be erased, so nothing is
    kept for the grace period in which a closed account's volumes and backups otherwise stay.
    Version 3 carries the customer's own ``reason`` (free text) only in ``sealed``
    (``PersonalData.reason``); a reason given by an operator or the system stays plain.
    """

    TYPE = "CustomerClosed"
    VERSION = 3

    customer_id: Id
    reason: str | None = None
    closed_by: Literal["customer", "admin", "system"]
    erase: bool = False
    sealed: SealedPersonalData | None = None


class EmailVerified(Event, frozen=True, kw_only=True):
    """The customer opened the link mailed to ``email``: the address is theirs.

    Carries no token: the link's token is stored hashed in signup's private tables and used once.
    Version 2 carries the address only in ``sealed`` (``PersonalData.email``).
    """

    TYPE = "EmailVerified"
    VERSION = 2

    customer_id: Id
    email: (
        Annotated[str, Meta(min_length=3, description="version 1 only: normalised, lower-case")]
        | None
    ) = None
    verified_at: UtcDateTime
    sealed: SealedPersonalData | None = None


class CredentialsChanged(Event, frozen=True, kw_only=True):
    """The customer set a new password (through a reset link). Session tokens issued before
    ``sessions_valid_from`` are no longer honoured.

    Carries no password, hash or token: only who and when.
    """

    TYPE = "CredentialsChanged"
    VERSION = 1

    customer_id: Id
    changed_at: UtcDateTime
    # Sessions whose ``iat`` is earlier than this are refused (a whole second, so a token
    # issued in the same second as the change is refused too).
    sessions_valid_from: UtcDateTime


# --- licensing ----------------------------------------------------------------------------------


class LicenseIssued(Event, frozen=True, kw_only=True):
    """A signed license now governs the customer's instance; the provisioner deploys it.

    ``jwt`` is the signed token the customer's instance verifies with the public key: the
    customer may see it. The private signing key never leaves the licensing service.
    """

    TYPE = "LicenseIssued"
    VERSION = 1

    customer_id: Id
    license_id: Id
    jwt: Annotated[str, Meta(min_length=1, description="the signed RS256 license token")]
    kid: Annotated[str, Meta(min_length=1, description="id of the key in the JWKS that signed")]
    plan: Plan
    issued_at: UtcDateTime
    expires_at: UtcDateTime
    features: Features
    limits: Limits
    license_type: Annotated[
        str,
        Meta(
            min_length=1,
            description="why it was issued: trial_signup, subscription, renewal, grace, final",
        ),
    ]
    reason: str | None = None
    issued_by: str = "system"
    grace_until: UtcDateTime | None = None


class LicenseRevoked(Event, frozen=True, kw_only=True):
    """A license no longer holds; instances that verify it must stop honouring it."""

    TYPE = "LicenseRevoked"
    VERSION = 1

    customer_id: Id
    license_id: Id
    reason: str
    revoked_by: str = "system"


# --- billing ------------------------------------------------------------------------------------


class TrialStarted(Event, frozen=True, kw_only=True):
    """The customer's free trial runs from now until ``trial_ends_at``."""

    TYPE = "TrialStarted"
    VERSION = 1

    customer_id: Id
    plan: Plan
    trial_started_at: UtcDateTime
    trial_ends_at: UtcDateTime
    trial_days: Annotated[int, Meta(ge=1)]


class TrialExpired(Event, frozen=True, kw_only=True):
    """The trial ended without a subscription; licensing issues the grace or final license."""

    TYPE = "TrialExpired"
    VERSION = 1

    customer_id: Id
    trial_ended_at: UtcDateTime


class SubscriptionActivated(Event, frozen=True, kw_only=True):
    """A Stripe subscription was created and paid; the license follows its plan."""

    TYPE = "SubscriptionActivated"
    VERSION = 1

    customer_id: Id
    plan: Plan
    status: Annotated[str, Meta(description="Stripe's subscription status, e.g. active")]
    stripe_customer_id: Id
    stripe_subscription_id: Id
    current_period_end: UtcDateTime | None = None
    stripe_event_id: str | None = None


class SubscriptionChanged(Event, frozen=True, kw_only=True):
    """A subscription's plan or status changed in Stripe (upgrade, downgrade, past_due...)."""

    TYPE = "SubscriptionChanged"
    VERSION = 1

    customer_id: Id
    plan: Plan
    previous_plan: Plan | None = None
    status: Annotated[str, Meta(description="Stripe's subscription status, e.g. past_due")]
    stripe_subscription_id: Id
    current_period_end: UtcDateTime | None = None
    stripe_event_id: str | None = None


class PaymentFailed(Event, frozen=True, kw_only=True):
    """Stripe could not collect an invoice; the customer is told, and may fall into grace."""

    TYPE = "PaymentFailed"
    VERSION = 1

    customer_id: Id
    stripe_invoice_id: Id
    stripe_subscription_id: str | None = None
    amount_due: Annotated[int, Meta(ge=0, description="in the currency's minor unit (cents)")]
    currency: Annotated[
        str, Meta(min_length=3, max_length=3, description="ISO 4217, lower-case as Stripe sends")
    ]
    attempt_count: Count
    next_payment_attempt: UtcDateTime | None = None
    stripe_event_id: str | None = None


class SubscriptionCanceled(Event, frozen=True, kw_only=True):
    """A subscription ended; the license falls back to grace and then to final."""

    TYPE = "SubscriptionCanceled"
    VERSION = 1

    customer_id: Id
    stripe_subscription_id: Id
    canceled_at: UtcDateTime
    reason: str | None = None
    stripe_event_id: str | None = None


# Stripe's ids (evt_..., sub_..., cus_...) and ours in Stripe's metadata: letters, digits, "_"
# and "-" only, so no name, email or sentence can pass for one.
StripeRef = Annotated[
    str, Meta(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_-]+$", description="an id")
]
StripeWord = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=64,
        pattern=r"^[a-z_]+$",
        description="one of Stripe's enum values, e.g. past_due",
    ),
]
# The largest integer every JSON reader reads exactly (2**53 - 1): no real amount comes near it.
MinorUnits = Annotated[
    int, Meta(ge=0, le=2**53 - 1, description="in the currency's minor unit (cents)")
]
PaidPlan = Literal["starter", "professional", "enterprise"]
# An invoice's number as Stripe numbers them (a prefix, a dash and a sequence: ABCD1234-0001).
InvoiceNumber = Annotated[
    str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_./#-]*$")
]
# The invoice's page at Stripe: a web address and nothing else (no script, no spaces).
InvoiceUrl = Annotated[
    str,
    Meta(
        min_length=8,
        max_length=2048,
        pattern=r"^https?://[A-Za-z0-9._~:/?#@!$&'()*+,;=%-]+$",
        description="the invoice's page at Stripe",
    ),
]
Currency = Annotated[str, Meta(pattern=r"^[a-z]{3}$", description="ISO 4217, lower-case")]


class StripeFacts(Struct, frozen=True, kw_only=True):
    """What billing reads of a Stripe event's ``data.object``, and nothing else of it.

    Ids, states, amounts and times, named after Stripe's fields (``metadata_*`` come from the
    object's ``metadata``, ``price`` from its first item's price, ``cancellation_reason`` from
    ``cancellation_details.reason``). No names, emails, addresses, card details or free text.
    """

    id: StripeRef | None = None
    customer: Annotated[StripeRef, Meta(description="Stripe's customer, cus_...")] | None = None
    metadata_customer_id: Annotated[StripeRef, Meta(description="our customer id")] | None = None
    metadata_plan: PaidPlan | None = None
    client_reference_id: StripeRef | None = None
    subscription: Annotated[StripeRef, Meta(description="an invoice's sub_...")] | None = None
    status: StripeWord | None = None
    price: Annotated[StripeRef, Meta(description="price_... of the first item")] | None = None
    current_period_end: UtcDateTime | None = None
    canceled_at: UtcDateTime | None = None
    cancellation_reason: StripeWord | None = None
    amount_due: MinorUnits | None = None
    currency: Currency | None = None
    attempt_count: Annotated[int, Meta(ge=0, le=2**31 - 1)] | None = None
    next_payment_attempt: UtcDateTime | None = None
    # Since version 3 of StripeEventReceived: what an invoice's line in the account shows.
    number: InvoiceNumber | None = None
    amount_paid: MinorUnits | None = None
    created: Annotated[UtcDateTime, Meta(description="when Stripe made the object")] | None = None
    hosted_invoice_url: InvoiceUrl | None = None


class StripeEventReceived(Event, frozen=True, kw_only=True):
    """A verified Stripe webhook, stored once so billing can (re)derive its own events from it.

    ``customer_id`` is optional because an event may arrive before we can map it to a customer.
    Version 1 carried the body as Stripe sent it in ``payload``, personal data and all. Version
    2 carries only ``facts``, what billing derives its events from (none for the Stripe types
    billing does not read); the body stays in billing's own table for a retention period.
    Version 3's facts add an invoice's number, amount paid, creation time and page.
    """

    TYPE = "StripeEventReceived"
    VERSION = 3

    customer_id: str | None = None
    stripe_event_id: Id
    stripe_type: Annotated[str, Meta(min_length=1, description="e.g. invoice.payment_failed")]
    stripe_created: UtcDateTime
    livemode: bool
    api_version: str | None = None
    payload: (
        Annotated[str, Meta(description="version 1 only: the verified JSON text as sent")] | None
    ) = None
    facts: StripeFacts | None = None


class InvoiceRecorded(Event, frozen=True, kw_only=True):
    """An invoice of the customer's, in a state Stripe reported (``open`` when a payment
    failed, ``paid`` once collected): what the account's invoice list shows.

    Appended once per invoice and state, however often and in whatever order Stripe sends
    its webhooks. Only Stripe's ids, amounts, times and the invoice's page: no name, address
    or card detail.
    """

    TYPE = "InvoiceRecorded"
    VERSION = 1

    customer_id: Id
    stripe_invoice_id: StripeRef
    number: InvoiceNumber | None = None
    status: StripeWord
    amount: Annotated[MinorUnits, Meta(description="paid, or due while unpaid; minor units")]
    currency: Currency
    created_at: Annotated[UtcDateTime, Meta(description="when Stripe made the invoice")]
    hosted_invoice_url: InvoiceUrl | None = None


class StripeCustomerLinked(Event, frozen=True, kw_only=True):
    """Our customer has a Stripe customer: the two-ID mapping billing keeps.

    Appended once per customer when a checkout first creates the Stripe customer (whose
    ``metadata.customer_id`` names ours), so the mapping is rebuilt by replay like any view.
    """

    TYPE = "StripeCustomerLinked"
    VERSION = 1

    customer_id: Id
    stripe_customer_id: Id
    linked_via: Literal["checkout", "webhook", "admin"] = "checkout"


# --- provisioner --------------------------------------------------------------------------------

DeploymentKind = Literal["deploy-customer-stack", "update-customer-stack", "delete-customer-stack"]


class DeploymentRequested(Event, frozen=True, kw_only=True):
    """A deployment job is queued for the customer's instance."""

    TYPE = "DeploymentRequested"
    VERSION = 2

    customer_id: Id
    job_id: Id
    kind: DeploymentKind
    plan: Plan | None = None
    priority: Annotated[int, Meta(ge=1, le=10, description="1 is most urgent")]
    license_id: str | None = None
    requested_by: str = "system"
    # Version 2: a removal that erases the data at once instead of keeping it for the grace
    # period (the customer asked for erasure).
    erase: bool = False


class DeploymentStarted(Event, frozen=True, kw_only=True):
    """A worker claimed a deployment job and began an attempt."""

    TYPE = "DeploymentStarted"
    VERSION = 1

    customer_id: Id
    job_id: Id
    attempt: Attempt
    backend: Annotated[str, Meta(min_length=1, description="e.g. local, kubernetes")]
    worker_id: Id


class DeploymentProgressed(Event, frozen=True, kw_only=True):
    """A running deployment reached a step; shown to the customer while they wait."""

    TYPE = "DeploymentProgressed"
    VERSION = 1

    customer_id: Id
    job_id: Id
    progress: Annotated[int, Meta(ge=0, le=100, description="percent done")]
    step: str


class DeploymentSucceeded(Event, frozen=True, kw_only=True):
    """The customer's instance is running and reachable."""

    TYPE = "DeploymentSucceeded"
    VERSION = 1

    customer_id: Id
    job_id: Id
    backend: Annotated[str, Meta(min_length=1)]
    instance_url: str | None = None
    components: Annotated[
        dict[str, str], Meta(description="component name to its state, e.g. api: ready")
    ] = field(default_factory=dict)


class DeploymentFailed(Event, frozen=True, kw_only=True):
    """An attempt failed; ``will_retry`` says whether the job goes back on the queue."""

    TYPE = "DeploymentFailed"
    VERSION = 1

    customer_id: Id
    job_id: Id
    attempt: Attempt
    error: str
    will_retry: bool
    next_attempt_at: UtcDateTime | None = None


class DeploymentRetried(Event, frozen=True, kw_only=True):
    """A failed job goes back on the queue for a fresh set of attempts (an operator asked)."""

    TYPE = "DeploymentRetried"
    VERSION = 1

    customer_id: Id
    job_id: Id
    requested_by: str = "admin"


class DeploymentSuperseded(Event, frozen=True, kw_only=True):
    """A waiting job will not run: a newer job for the same customer covers it."""

    TYPE = "DeploymentSuperseded"
    VERSION = 1

    customer_id: Id
    job_id: Id
    superseded_by: Id


class DeploymentJobRemoved(Event, frozen=True, kw_only=True):
    """A finished job was cleaned from the queue's views (its events stay on the log)."""

    TYPE = "DeploymentJobRemoved"
    VERSION = 1

    customer_id: Id
    job_id: Id
    removed_by: str = "admin"


class DeploymentWaitingForCapacity(Event, frozen=True, kw_only=True):
    """A deploy of a customer who has no instance yet waits: the platform runs as many
    instances as it can hold. The job stays queued and starts by itself when a slot frees;
    recorded once per job."""

    TYPE = "DeploymentWaitingForCapacity"
    VERSION = 1

    customer_id: Id
    job_id: Id
    running: Annotated[int, Meta(ge=0, description="instances running or starting")]
    capacity: Annotated[int, Meta(ge=0, description="instances the platform can hold")]


class InstanceCapacityChanged(Event, frozen=True, kw_only=True):
    """The platform's room for instances changed: it became full or had room again, or the
    number it can hold changed. About no customer (keyed ``platform``); appended only on such
    a change, once, whichever provisioner replica noticed it."""

    TYPE = "InstanceCapacityChanged"
    VERSION = 1

    running: Annotated[int, Meta(ge=0, description="instances running or starting")]
    capacity: (
        Annotated[int, Meta(ge=0, description="instances the platform can hold; null: no limit")]
        | None
    ) = None
    limited_by: (
        Annotated[
            Literal["connections", "memory", "setting"],
            Meta(description="which bound sets the capacity"),
        ]
        | None
    ) = None
    full: bool


class InstanceDegraded(Event, frozen=True, kw_only=True):
    """A deployed instance stopped being healthy (not ready, or not answering): the
    provisioner's health watch saw it, and redeploys it if it stays so for long."""

    TYPE = "InstanceDegraded"
    VERSION = 1

    customer_id: Id
    reason: Annotated[
        str, Meta(max_length=500, description="what the check saw, e.g. not answering: timeout")
    ]
    since: Annotated[UtcDateTime, Meta(description="when the check first found it unhealthy")]


class InstanceRecovered(Event, frozen=True, kw_only=True):
    """A degraded instance is healthy again by itself (a redeploy that succeeds says so with
    its DeploymentSucceeded instead)."""

    TYPE = "InstanceRecovered"
    VERSION = 1

    customer_id: Id
    degraded_since: Annotated[UtcDateTime, Meta(description="``since`` of the InstanceDegraded")]
    recovered_at: Annotated[UtcDateTime, Meta(description="when the check found it healthy")]


# --- instance -----------------------------------------------------------------------------------


class UsageReported(Event, frozen=True, kw_only=True):
    """An instance's usage for one UTC day, reported as it goes and once more when final."""

    TYPE = "UsageReported"
    VERSION = 1

    customer_id: Id
    day: Annotated[date, Meta(description="the UTC day counted")]
    devices: Count
    mqtt_messages: Count
    api_requests: Count
    rejected_readings: Count
    storage_bytes: Count
    final: bool = False  # true once the day is over and its counts will not change


class QuotaNoticeReported(Event, frozen=True, kw_only=True):
    """An instance's meter reached 80% or 100% of its license's limit (once per meter and day;
    for devices, once per crossing): the customer is told (signup mails the account's
    address). No personal data: the meter and the counts only."""

    TYPE = "QuotaNoticeReported"
    VERSION = 1

    customer_id: Id
    meter: Literal["devices", "mqtt_messages", "api_requests"]
    level: Annotated[int, Meta(ge=1, le=100, description="the percentage reached: 80 or 100")]
    used: Count
    limit: Count
    period: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=64,
            description="the UTC day of a daily meter, or the start of a devices crossing",
        ),
    ]
    noticed_at: Annotated[UtcDateTime, Meta(description="when the instance noticed it")]


# --- erasure (signup) -------------------------------------------------------------------------


class CustomerErased(Event, frozen=True, kw_only=True):
    """The customer's personal data is erased: their data key is destroyed, so the sealed
    personal data of every event about them can no longer be read, and every view drops it.
    The events themselves stay, readable for everything else, so replays still work."""

    TYPE = "CustomerErased"
    VERSION = 1

    customer_id: Id
    key_id: Annotated[str, Meta(description="the data key destroyed")] | None = None
    erased_by: Literal["customer", "admin"]
    erased_at: UtcDateTime


# --- the table ----------------------------------------------------------------------------------

# Every event this code can read. A type is never removed: the log still holds its events.
ALL_EVENTS: tuple[type[Event], ...] = (
    CustomerSignedUp,
    CustomerClosed,
    EmailVerified,
    CredentialsChanged,
    LicenseIssued,
    LicenseRevoked,
    TrialStarted,
    TrialExpired,
    SubscriptionActivated,
    SubscriptionChanged,
    PaymentFailed,
    SubscriptionCanceled,
    StripeEventReceived,
    StripeCustomerLinked,
    InvoiceRecorded,
    DeploymentRequested,
    DeploymentStarted,
    DeploymentProgressed,
    DeploymentSucceeded,
    DeploymentFailed,
    DeploymentRetried,
    DeploymentSuperseded,
    DeploymentJobRemoved,
    DeploymentWaitingForCapacity,
    InstanceCapacityChanged,
    InstanceDegraded,
    InstanceRecovered,
    UsageReported,
    QuotaNoticeReported,
    CustomerErased,
)

EVENT_TYPES: dict[str, type[Event]] = {cls.TYPE: cls for cls in ALL_EVENTS}


def event_type(name: str) -> type[Event]:
    """The event class registered under ``name``, for code that reads types off the wire.

    Raises ``UnknownEventType`` (a ``MalformedEvent``) so callers park it like any unreadable
    event instead of crashing on a ``KeyError``.
    """
    try:
        return EVENT_TYPES[name]
    except KeyError:
        raise UnknownEventType(f"unknown event type {name!r}") from None
