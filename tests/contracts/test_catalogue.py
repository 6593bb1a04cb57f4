"""The event catalogue: generated from the declarations, committed, and true to the code.

Who emits and who consumes each event is read from the services (``services/catalogue.py``);
these tests fail when a service constructs an event it does not own, when docs/events.md or the
AsyncAPI document lag behind the code, or when the AsyncAPI document stops being valid AsyncAPI
3.0 (checked with the specification's own JSON Schema, the npm package ``@asyncapi/specs``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from contracts import EVENT_TYPES
from services import catalogue
from services.bus import event_owners
from services.targets import CONTROL_PLANE

ROOT = Path(__file__).resolve().parents[2]
SPEC = (
    ROOT / "tests/deploy/kube-schemas/node_modules/@asyncapi/specs/schemas/3.0.0-without-$id.json"
)


@pytest.fixture(scope="module")
def entries() -> list[catalogue.EventEntry]:
    return catalogue.catalogue()


def test_no_service_constructs_an_event_it_does_not_own() -> None:
    owners = event_owners()
    classes = {cls.__name__: event_type for event_type, cls in EVENT_TYPES.items()}
    found = catalogue.constructions(ROOT / "services", classes)
    strays = [
        (path, classes[name], owners[classes[name]])
        for name, paths in found.items()
        for path in paths
        if not path.startswith(f"services/{owners[classes[name]]}/")
    ]
    assert strays == []
    assert found, "the scan must find the services' events, or it proves nothing"


def test_a_construction_outside_the_owner_is_found(tmp_path: Path) -> None:
    """The scan the test above relies on sees a call by name and by attribute."""
    (tmp_path / "stray.py").write_text(
        "import contracts\nfrom contracts import LicenseIssued\n"
        "a = LicenseIssued(customer_id='c')\nb = contracts.TrialStarted(customer_id='c')\n"
    )
    catalogue_root = catalogue.ROOT
    catalogue.ROOT = tmp_path
    try:
        found = catalogue.constructions(tmp_path, {"LicenseIssued", "TrialStarted", "X"})
    finally:
        catalogue.ROOT = catalogue_root
    assert found == {"LicenseIssued": {"stray.py"}, "TrialStarted": {"stray.py"}}


def test_every_event_has_an_owner_and_every_consumer_is_declared(
    entries: list[catalogue.EventEntry],
) -> None:
    assert [e.type for e in entries] == sorted(EVENT_TYPES)
    declared = {
        (d.name, name)
        for d in CONTROL_PLANE.values()
        for name in (*(p.name for p in d.projections), *d.reactor_names)
    }
    for entry in entries:
        assert entry.owner in CONTROL_PLANE
        for consumer in entry.consumers:
            assert (consumer.service, consumer.name) in declared
    # Spot checks against what the services are known to do.
    by_type = {e.type: e for e in entries}
    assert by_type["LicenseIssued"].owner == "licensing"
    assert ("provisioner", "queue_deployments", "reactor") in {
        (c.service, c.name, c.kind) for c in by_type["LicenseIssued"].consumers
    }
    assert by_type["CustomerSignedUp"].emitted_in
    assert all(f.startswith("services/signup/") for f in by_type["CustomerSignedUp"].emitted_in)


def test_the_committed_catalogue_and_asyncapi_are_up_to_date(
    entries: list[catalogue.EventEntry],
) -> None:
    stale = "out of date: run ./dev catalogue"
    assert catalogue.EVENTS_DOC.read_text() == catalogue.markdown(entries), stale
    assert catalogue.ASYNCAPI_DOC.read_text() == catalogue.asyncapi_json(entries), stale


def _errors(document: dict[str, Any]) -> list[str]:
    spec = json.loads(SPEC.read_text())
    validator = jsonschema.Draft7Validator(spec)
    return [error.message for error in validator.iter_errors(document)]


def test_the_asyncapi_document_is_valid_asyncapi_3(entries: list[catalogue.EventEntry]) -> None:
    document = catalogue.asyncapi(entries)
    assert _errors(document) == []
    assert set(document["channels"]) == set(EVENT_TYPES)
    assert document["channels"]["LicenseIssued"]["address"] == "iotistic.events.LicenseIssued.{key}"
    sends = [k for k, op in document["operations"].items() if op["action"] == "send"]
    assert sorted(sends) == sorted(f"{e.owner}.emits.{e.type}" for e in entries)
    # The check is real: a broken document is refused.
    broken = copy.deepcopy(document)
    broken["operations"]["licensing.emits.LicenseIssued"]["action"] = "publish"
    assert _errors(broken)
