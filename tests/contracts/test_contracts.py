"""The event contracts keep their promises.

Old events stay readable (stored example payloads and frozen schemas), the committed schema
export is current, the envelope round-trips and rejects garbage with a reason, and no event
has a field for a secret.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import pytest

import contracts
from contracts import (
    EVENT_TYPES,
    CustomerSignedUp,
    DeploymentProgressed,
    DeploymentSucceeded,
    Envelope,
    Event,
    Features,
    InstanceDegraded,
    InstanceRecovered,
    LicenseIssued,
    Limits,
    MalformedEvent,
    TraceContext,
    UnknownEventType,
    UsageReported,
    decode_envelope,
    decode_event,
    encode_envelope,
    event_type,
    new_envelope,
)
from contracts.events import ALL_EVENTS
from contracts.schema import (
    ENVELOPE_SCHEMA_FILE,
    SCHEMA_FOLDER,
    check_compatible,
    envelope_schema,
    event_schema,
    export_schemas,
    frozen_versions,
    schema_path,
)

PAYLOADS = Path(__file__).parent / "payloads"
PAYLOAD_NAME = re.compile(r"^(?P<type>[A-Za-z]+)\.v(?P<version>[1-9][0-9]*)\.json$")
ENVELOPE_EXAMPLE = PAYLOADS / "envelope.v1.json"
PAYLOAD_FILES = sorted(p for p in PAYLOADS.glob("*.json") if not p.name.startswith("envelope."))
FROZEN_SCHEMAS = sorted(SCHEMA_FOLDER.glob("*/v*.json"))
SECRET_NAME = re.compile(r"passw|pwd|hash|secret|private_?key|api_?key|signing_?key", re.I)
REGENERATE = "run `python -m contracts.schema contracts/schemas` and commit the result"
CUSTOMER = "8f14e45f-ceea-4e7a-9c3b-2d1f0a6b7c11"


def parse_payload_name(path: Path) -> tuple[str, int]:
    match = PAYLOAD_NAME.match(path.name)
    assert match, f"{path.name}: example payloads are named <EventType>.v<N>.json"
    return match["type"], int(match["version"])


def wrap(type_name: str, version: int, body: bytes, **extra: Any) -> bytes:
    """An envelope on the wire around a raw body, as an old producer would have written it."""
    envelope = {
        "event_id": str(uuid.uuid4()),
        "type": type_name,
        "version": version,
        "occurred_at": "2026-11-24T18:00:00.123456Z",
        "customer_id": CUSTOMER,
        "correlation_id": "corr-1",
        "causation_id": None,
        "trace": {"traceparent": None, "tracestate": None},
        "data": msgspec.Raw(body),
    }
    return msgspec.json.encode({**envelope, **extra})


def signed_up(email: str = "ada@example.com") -> CustomerSignedUp:
    return CustomerSignedUp(
        customer_id=CUSTOMER,
        email=email,
        email_display=email,
        company_name="Analytical Engines Ltd",
        signed_up_at=datetime(2026, 11, 24, 18, 0, tzinfo=UTC),
    )


def progressed(progress: int = 40) -> DeploymentProgressed:
    return DeploymentProgressed(
        customer_id=CUSTOMER, job_id="job-1", progress=progress, step="creating database"
    )


# --- the registry -------------------------------------------------------------------------------


def test_the_registry_names_every_event_by_its_class_name_once() -> None:
    assert len(EVENT_TYPES) == len(ALL_EVENTS), "an event type is listed twice"
    for name, cls in EVENT_TYPES.items():
        assert name == cls.TYPE == cls.__name__
        assert cls.VERSION >= 1
        assert event_type(name) is cls
        assert name in contracts.__all__, f"export {name} from contracts/__init__.py"


@pytest.mark.parametrize("cls", ALL_EVENTS, ids=lambda cls: cls.TYPE)
def test_events_are_frozen_and_accept_unknown_fields(cls: type[Event]) -> None:
    config = cls.__struct_config__
    assert config.frozen
    assert not config.forbid_unknown_fields, "old readers must accept fields added later"
    assert config.tag is None, "the envelope carries the type; the body has no tag"


def test_license_values_keep_their_camel_case_claim_names() -> None:
    features = Features(
        maxDevices=10, dataRetentionDays=30, alerting=True, apiAccess=True, webhooks=False
    )
    limits = Limits(mqttMessagesPerDay=100_000, apiRequestsPerDay=10_000)
    assert set(json.loads(msgspec.json.encode(features))) == {
        "maxDevices",
        "dataRetentionDays",
        "alerting",
        "apiAccess",
        "webhooks",
    }
    assert set(json.loads(msgspec.json.encode(limits))) == {
        "mqttMessagesPerDay",
        "apiRequestsPerDay",
    }


# --- 1, 2: stored example payloads --------------------------------------------------------------


@pytest.mark.parametrize("path", PAYLOAD_FILES, ids=lambda p: p.name)
def test_every_stored_payload_decodes_with_the_current_struct(path: Path) -> None:
    type_name, version = parse_payload_name(path)
    envelope = decode_envelope(wrap(type_name, version, path.read_bytes()))
    event = decode_event(envelope)
    assert type(event) is EVENT_TYPES[type_name]
    # And what it decodes to can be written to the log again and read back unchanged.
    rewrapped = new_envelope(event, customer_id=getattr(event, "customer_id", None))
    assert decode_event(decode_envelope(encode_envelope(rewrapped))) == event


def test_every_event_version_has_a_stored_example_payload() -> None:
    stored = {parse_payload_name(path) for path in PAYLOAD_FILES}
    missing = [
        f"{cls.TYPE}.v{version}.json"
        for cls in ALL_EVENTS
        for version in range(1, cls.VERSION + 1)
        if (cls.TYPE, version) not in stored
    ]
    assert not missing, f"add example payloads (the event's data body) to {PAYLOADS}: {missing}"


@pytest.mark.parametrize("cls", ALL_EVENTS, ids=lambda cls: cls.TYPE)
def test_the_current_versions_example_shows_every_field(cls: type[Event]) -> None:
    path = PAYLOADS / f"{cls.TYPE}.v{cls.VERSION}.json"
    if not path.exists():
        pytest.fail(f"{path.name} is missing")
    body = json.loads(path.read_text(encoding="utf-8"))
    missing = [f.encode_name for f in msgspec.structs.fields(cls) if f.encode_name not in body]
    assert not missing, (
        f"{cls.TYPE} has fields its v{cls.VERSION} example lacks: {missing}. New fields come "
        f"in a new VERSION, with a new example {cls.TYPE}.v{cls.VERSION + 1}.json"
    )


# --- 3, 4: frozen and current schemas -----------------------------------------------------------


@pytest.mark.parametrize("path", FROZEN_SCHEMAS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_current_struct_reads_what_every_frozen_schema_allowed(path: Path) -> None:
    cls = EVENT_TYPES.get(path.parent.name)
    assert cls is not None, (
        f"{path.parent.name} has stored schemas but is not registered: event types are never "
        "removed, the log still holds their events"
    )
    frozen = json.loads(path.read_text(encoding="utf-8"))
    assert frozen["x-event-version"] <= cls.VERSION
    problems = check_compatible(frozen, event_schema(cls))
    assert problems == [], f"{cls.TYPE} can no longer decode what {path.name} allowed"


@pytest.mark.parametrize("cls", ALL_EVENTS, ids=lambda cls: cls.TYPE)
def test_every_version_of_every_event_has_a_stored_schema(cls: type[Event]) -> None:
    stored = frozen_versions(SCHEMA_FOLDER, cls.TYPE)
    missing = [v for v in range(1, cls.VERSION + 1) if v not in stored]
    assert not missing, f"{cls.TYPE} has no stored schema for versions {missing}: {REGENERATE}"


@pytest.mark.parametrize("cls", ALL_EVENTS, ids=lambda cls: cls.TYPE)
def test_the_committed_schema_of_the_current_version_is_fresh(cls: type[Event]) -> None:
    path = schema_path(SCHEMA_FOLDER, cls)
    committed = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    fresh = json.loads(json.dumps(event_schema(cls)))
    assert committed == fresh, f"{path} is stale or missing: {REGENERATE}"


def test_the_committed_envelope_schema_is_fresh() -> None:
    path = SCHEMA_FOLDER / ENVELOPE_SCHEMA_FILE
    committed = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    assert committed == json.loads(json.dumps(envelope_schema())), f"{path} is stale: {REGENERATE}"


class Probe(Event, frozen=True, kw_only=True):
    """A made-up event at version 2, to export beside a frozen version 1."""

    TYPE = "Probe"
    VERSION = 2

    reading: float
    note: str | None = None


def test_export_rewrites_the_current_version_and_leaves_older_ones(tmp_path: Path) -> None:
    frozen = tmp_path / "Probe" / "v1.json"
    frozen.parent.mkdir()
    frozen.write_text('{"frozen": true}\n', encoding="utf-8")
    (tmp_path / "Probe" / "v2.json").write_text("{}\n", encoding="utf-8")

    written = export_schemas(tmp_path, events=[Probe])

    assert written == [tmp_path / "Probe" / "v2.json", tmp_path / ENVELOPE_SCHEMA_FILE]
    assert frozen.read_text(encoding="utf-8") == '{"frozen": true}\n'
    text = written[0].read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert text == json.dumps(event_schema(Probe), indent=2, sort_keys=True) + "\n"
    assert json.loads(text)["x-event-version"] == 2
    assert frozen_versions(tmp_path, "Probe") == {1: frozen, 2: written[0]}


def test_export_writes_every_registered_event(tmp_path: Path) -> None:
    written = export_schemas(tmp_path)
    assert len(written) == len(EVENT_TYPES) + 1
    assert all(path.is_file() for path in written)


# --- 5: check_compatible finds breaking changes -------------------------------------------------


class Calibration(msgspec.Struct, kw_only=True):
    offset: float


class CalibrationAsText(msgspec.Struct, kw_only=True):
    offset: str


class ReadingV1(msgspec.Struct, kw_only=True):
    sensor_id: str
    celsius: float
    count: int = 0
    note: str | None = None
    unit: Literal["C", "F"] = "C"
    taken_at: datetime | None = None
    calibration: Calibration | None = None
    tags: dict[str, str] = msgspec.field(default_factory=dict)


class ReadingCompatible(msgspec.Struct, kw_only=True):
    """Only safe changes: an optional field, a widened Literal, int to float, a loosened type."""

    sensor_id: str
    celsius: float
    count: float = 0
    note: str | int | None = None
    unit: Literal["C", "F", "K"] = "C"
    taken_at: str | None = None
    calibration: Calibration | None = None
    tags: dict[str, str] = msgspec.field(default_factory=dict)
    humidity: float | None = None


class ReadingFieldRemoved(msgspec.Struct, kw_only=True):
    sensor_id: str
    celsius: float


class ReadingNewRequired(ReadingV1, kw_only=True):
    humidity: float


class ReadingNoteRequired(msgspec.Struct, kw_only=True):
    sensor_id: str
    celsius: float
    note: str


class ReadingCelsiusAsText(msgspec.Struct, kw_only=True):
    sensor_id: str
    celsius: str


class ReadingCountNarrowed(msgspec.Struct, kw_only=True):
    sensor_id: str
    celsius: float
    count: bool = False


class ReadingNoteNotNull(msgspec.Struct, kw_only=True):
    sensor_id: str
    celsius: float
    note: str = ""


class ReadingFewerUnits(msgspec.Struct, kw_only=True):
    sensor_id: str
    celsius: float
    unit: Literal["C"] = "C"


class ReadingFormatAdded(msgspec.Struct, kw_only=True):
    sensor_id: Annotated[datetime, msgspec.Meta(tz=True)]  # "format": "date-time"
    celsius: float


class ReadingNestedChanged(msgspec.Struct, kw_only=True):
    sensor_id: str
    celsius: float
    calibration: CalibrationAsText | None = None


class ReadingTagsAsNumbers(msgspec.Struct, kw_only=True):
    sensor_id: str
    celsius: float
    tags: dict[str, int] = msgspec.field(default_factory=dict)


class ReadingBounded(msgspec.Struct, kw_only=True):
    sensor_id: str
    celsius: float
    count: Annotated[int, msgspec.Meta(ge=1)] = 1


class ReadingStrict(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    sensor_id: str
    celsius: float
    count: int = 0
    note: str | None = None
    unit: Literal["C", "F"] = "C"
    taken_at: datetime | None = None
    calibration: Calibration | None = None
    tags: dict[str, str] = msgspec.field(default_factory=dict)


def schema_of(cls: type[msgspec.Struct]) -> dict[str, Any]:
    # Through JSON, as check_compatible sees a frozen file.
    result: dict[str, Any] = json.loads(json.dumps(msgspec.json.schema(cls)))
    return result


@pytest.mark.parametrize("new", [ReadingV1, ReadingCompatible, ReadingFieldRemoved])
def test_check_compatible_accepts_safe_changes(new: type[msgspec.Struct]) -> None:
    assert check_compatible(schema_of(ReadingV1), schema_of(new)) == []


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        (ReadingNewRequired, "humidity: required now, but was absent"),
        (ReadingNoteRequired, "note: required now, but was optional"),
        (ReadingCelsiusAsText, "celsius: type changed"),
        (ReadingCountNarrowed, "count: type changed"),
        (ReadingNoteNotNull, "note: type changed: accepted null"),
        (ReadingFewerUnits, "unit: no longer accepts ['F']"),
        (ReadingFormatAdded, "sensor_id: format changed"),
        (ReadingNestedChanged, "calibration.offset: type changed"),
        (ReadingTagsAsNumbers, "tags{}: type changed"),
        (ReadingBounded, "count: minimum raised"),
        (ReadingStrict, "unknown fields are now forbidden"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_check_compatible_reports_breaking_changes(
    new: type[msgspec.Struct], expected: str
) -> None:
    problems = check_compatible(schema_of(ReadingV1), schema_of(new))
    assert any(expected in problem for problem in problems), problems


def test_check_compatible_reports_a_renamed_event() -> None:
    problems = check_compatible(event_schema(CustomerSignedUp), event_schema(Probe))
    assert any("renamed" in problem for problem in problems)


# --- 6: the envelope ----------------------------------------------------------------------------


def test_an_event_round_trips_through_the_envelope() -> None:
    event = signed_up()
    trace = TraceContext(traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    envelope = new_envelope(event, customer_id=CUSTOMER, trace=trace)

    wire = encode_envelope(envelope)
    back = decode_envelope(wire)

    assert back == envelope
    assert decode_event(back) == event
    assert uuid.UUID(envelope.event_id).version == 4
    assert (envelope.type, envelope.version) == ("CustomerSignedUp", CustomerSignedUp.VERSION)
    assert envelope.correlation_id == envelope.event_id, "a first event starts its own chain"
    assert envelope.causation_id is None
    assert envelope.occurred_at.tzinfo is not None
    assert back.trace == trace
    body = json.loads(wire)
    assert set(body) == {
        "event_id",
        "type",
        "version",
        "occurred_at",
        "customer_id",
        "correlation_id",
        "causation_id",
        "trace",
        "data",
    }
    assert body["occurred_at"].endswith("Z")
    assert body["data"]["email"] == "ada@example.com"
    assert "type" not in body["data"]


def test_every_field_kind_round_trips() -> None:
    usage = UsageReported(
        customer_id=CUSTOMER,
        day=date(2026, 11, 24),
        devices=3,
        mqtt_messages=10,
        api_requests=2,
        rejected_readings=0,
        storage_bytes=1024,
    )
    succeeded = DeploymentSucceeded(customer_id=CUSTOMER, job_id="job-1", backend="local")
    for event in (usage, succeeded, progressed()):
        envelope = new_envelope(event, customer_id=CUSTOMER)
        assert decode_event(decode_envelope(encode_envelope(envelope))) == event
    assert succeeded.components == {}


def test_instance_health_events_round_trip_and_keep_their_bounds() -> None:
    since = datetime(2026, 12, 7, 0, 20, tzinfo=UTC)
    degraded = InstanceDegraded(
        customer_id=CUSTOMER, reason="not answering: ReadTimeout", since=since
    )
    recovered = InstanceRecovered(
        customer_id=CUSTOMER, degraded_since=since, recovered_at=since + timedelta(seconds=30)
    )
    for event in (degraded, recovered):
        envelope = new_envelope(event, customer_id=CUSTOMER)
        assert decode_event(decode_envelope(encode_envelope(envelope))) == event
    # Listed with the provisioner's events, after the deployment jobs'.
    order = [cls.TYPE for cls in ALL_EVENTS]
    assert order.index("InstanceDegraded") > order.index("DeploymentJobRemoved")
    assert order.index("InstanceRecovered") == order.index("InstanceDegraded") + 1
    body = {"customer_id": CUSTOMER, "reason": "x", "since": "2026-12-07T00:20:00"}
    with pytest.raises(MalformedEvent, match="timezone"):
        decode_event(decode_envelope(wrap("InstanceDegraded", 1, json.dumps(body).encode())))
    body = {"customer_id": CUSTOMER, "reason": "x" * 501, "since": "2026-12-07T00:20:00Z"}
    with pytest.raises(MalformedEvent, match="length"):
        decode_event(decode_envelope(wrap("InstanceDegraded", 1, json.dumps(body).encode())))


def test_the_provisioner_owns_the_instance_health_events() -> None:
    from services.bus import event_owners

    # (tests/deploy checks that the chart's bus-permissions.json says the same.)
    owners = event_owners()
    assert owners["InstanceDegraded"] == owners["InstanceRecovered"] == "provisioner"


def test_correlation_and_causation_chain_through_caused_events() -> None:
    first = new_envelope(signed_up(), customer_id=CUSTOMER)
    second = new_envelope(progressed(10), customer_id=CUSTOMER, causation=first)
    third = new_envelope(progressed(20), customer_id=CUSTOMER, causation=second)

    assert second.causation_id == first.event_id
    assert third.causation_id == second.event_id
    assert first.correlation_id == second.correlation_id == third.correlation_id
    assert len({first.event_id, second.event_id, third.event_id}) == 3

    explicit = new_envelope(
        progressed(), customer_id=CUSTOMER, causation=first, correlation_id="request-7"
    )
    assert (explicit.correlation_id, explicit.causation_id) == ("request-7", first.event_id)


def test_new_envelope_keeps_given_ids_and_normalises_the_time_to_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    envelope = new_envelope(
        signed_up(),
        customer_id=CUSTOMER,
        event_id="fixed-id",
        occurred_at=datetime(2026, 11, 24, 20, 0, tzinfo=plus_two),
    )
    assert envelope.event_id == envelope.correlation_id == "fixed-id"
    assert envelope.occurred_at == datetime(2026, 11, 24, 18, 0, tzinfo=UTC)
    assert envelope.occurred_at.utcoffset() == timedelta(0)
    assert json.loads(encode_envelope(envelope))["occurred_at"] == "2026-11-24T18:00:00Z"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: new_envelope(progressed(150), customer_id=CUSTOMER), "progress"),
        (
            lambda: new_envelope(
                signed_up(), customer_id=CUSTOMER, occurred_at=datetime(2026, 11, 24)
            ),
            "timezone-aware",
        ),
        (lambda: new_envelope(signed_up(), customer_id="someone-else"), "differs"),
        (
            lambda: new_envelope(
                CustomerSignedUp(
                    customer_id=CUSTOMER,
                    email="a@b.c",
                    email_display="a@b.c",
                    company_name="X",
                    signed_up_at=datetime(2026, 11, 24),  # naive: would not decode
                ),
                customer_id=CUSTOMER,
            ),
            "timezone",
        ),
        (lambda: new_envelope(Probe(reading=1.0), customer_id=None), "EVENT_TYPES"),
    ],
    ids=["out-of-range", "naive-occurred-at", "customer-mismatch", "naive-field", "unregistered"],
)
def test_new_envelope_refuses_an_event_consumers_could_not_read(make: Any, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        make()


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"not json at all", "malformed envelope"),
        (b"", "malformed envelope"),
        (b'[{"event_id": "x"}]', "Expected `object`, got `array`"),
        (b'{"type": "CustomerSignedUp"}', "event_id"),
        (
            wrap("CustomerSignedUp", 1, b"{}", occurred_at="2026-11-24T18:00:00"),
            "occurred_at",
        ),
        (wrap("CustomerSignedUp", 0, b"{}"), "version"),
    ],
    ids=["garbage", "empty", "array", "missing-event-id", "naive-time", "version-0"],
)
def test_decode_envelope_rejects_what_is_not_an_envelope(wire: bytes, reason: str) -> None:
    with pytest.raises(MalformedEvent, match=re.escape(reason)):
        decode_envelope(wire)


def test_missing_event_id_is_named_in_the_reason() -> None:
    body = json.loads(ENVELOPE_EXAMPLE.read_bytes())
    del body["event_id"]
    with pytest.raises(MalformedEvent, match="missing required field `event_id`"):
        decode_envelope(json.dumps(body).encode())


def test_an_unknown_type_keeps_its_envelope_but_not_its_body() -> None:
    envelope = decode_envelope(wrap("InstanceHibernated", 1, b'{"customer_id": "c"}'))
    assert envelope.type == "InstanceHibernated"
    with pytest.raises(UnknownEventType, match="InstanceHibernated"):
        decode_event(envelope)
    with pytest.raises(UnknownEventType):
        event_type("InstanceHibernated")
    assert issubclass(UnknownEventType, MalformedEvent)


@pytest.mark.parametrize(
    "body",
    [b'{"customer_id": "c"}', b"[1, 2]", b'"text"', b"null"],
    ids=["missing-fields", "array", "string", "null"],
)
def test_a_body_that_does_not_fit_its_type_is_malformed(body: bytes) -> None:
    envelope = decode_envelope(wrap("CustomerSignedUp", 1, body))
    with pytest.raises(MalformedEvent, match="CustomerSignedUp v1") as caught:
        decode_event(envelope)
    assert not isinstance(caught.value, UnknownEventType)


def test_the_stored_envelope_example_decodes() -> None:
    envelope = decode_envelope(ENVELOPE_EXAMPLE.read_bytes())
    event = decode_event(envelope)
    assert isinstance(event, CustomerSignedUp)
    assert envelope.trace.traceparent is not None
    assert envelope.occurred_at == datetime(2026, 11, 24, 18, 0, 0, 123456, tzinfo=UTC)
    assert event.email == "ada.lovelace@analytical-engines.example"
    assert event.email_display == "Ada.Lovelace@Analytical-Engines.example"
    assert event.plan == "starter"


def test_an_envelope_from_a_newer_producer_still_decodes() -> None:
    body = json.loads(ENVELOPE_EXAMPLE.read_bytes())
    body["version"] = 2
    body["tenant_region"] = "eu-central"  # a new envelope field
    body["trace"]["baggage"] = "k=v"
    body["data"]["referral_code"] = "SPRING"  # a new event field
    body["data"]["marketing"] = {"opt_in": True}
    envelope = decode_envelope(json.dumps(body).encode())
    event = decode_event(envelope)
    assert isinstance(event, CustomerSignedUp)
    assert event.company_name == "Analytical Engines Ltd"
    assert envelope.version == 2


def test_an_old_envelope_without_optional_fields_decodes() -> None:
    body = json.loads(ENVELOPE_EXAMPLE.read_bytes())
    del body["causation_id"], body["trace"]
    envelope = decode_envelope(json.dumps(body).encode())
    assert envelope.causation_id is None
    assert envelope.trace == TraceContext()


def test_an_envelope_is_an_envelope() -> None:
    envelope = decode_envelope(ENVELOPE_EXAMPLE.read_bytes())
    assert isinstance(envelope, Envelope)
    assert isinstance(decode_event(envelope), Event)


# --- 7: secrets never travel in events ----------------------------------------------------------


def property_names(schema: dict[str, Any]) -> list[str]:
    return [
        f"{name}.{prop}"
        for name, definition in schema.get("$defs", {}).items()
        for prop in definition.get("properties", {})
    ]


@pytest.mark.parametrize("cls", ALL_EVENTS, ids=lambda cls: cls.TYPE)
def test_no_event_field_is_named_like_a_secret(cls: type[Event]) -> None:
    suspicious = [p for p in property_names(event_schema(cls)) if SECRET_NAME.search(p)]
    assert not suspicious, f"secrets never travel in events: {suspicious}"


def test_no_envelope_field_is_named_like_a_secret() -> None:
    names = property_names(envelope_schema())
    assert names
    assert not [p for p in names if SECRET_NAME.search(p)]


def test_the_secret_guard_would_notice() -> None:
    assert SECRET_NAME.search("CustomerSignedUp.password_hash")
    assert SECRET_NAME.search("LicenseIssued.private_key")
    assert SECRET_NAME.search("Stripe.webhook_secret")
    assert not SECRET_NAME.search("LicenseIssued.jwt")
    # Nested values are covered too: the schema lists every Struct an event contains.
    assert "Features.maxDevices" in property_names(event_schema(LicenseIssued))


def test_a_closure_or_removal_from_before_erasure_existed_keeps_the_data() -> None:
    """CustomerClosed and DeploymentRequested version 1 carry no ``erase``: read today, they
    mean what they meant then, a removal that keeps the data for the grace period."""
    for name in ("CustomerClosed", "DeploymentRequested"):
        for version, erase in ((1, False), (2, True)):
            body = (PAYLOADS / f"{name}.v{version}.json").read_bytes()
            event = decode_event(decode_envelope(wrap(name, version, body)))
            assert isinstance(event, contracts.CustomerClosed | contracts.DeploymentRequested)
            assert event.erase is erase, (name, version)
