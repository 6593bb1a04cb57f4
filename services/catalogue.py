"""The event catalogue: who emits each event type (and in which files), who consumes it.

Generated from the declarations, never written by hand:

- the owner is the service whose ``ServiceDefinition.emits`` names the type (``services/bus.py``
  turns the same declarations into the bus permissions the server enforces);
- the files are those of the owner's package that construct the event, found by reading the
  source (an event constructed in a service that does not own it is a contract test failure);
- the consumers are the projections and reactors whose handler tables name the type.

``python -m services.catalogue`` prints the table; ``--write`` refreshes ``docs/events.md`` and the
AsyncAPI 3.0 document of the log (``contracts/asyncapi.json``, served by every service at
``/schema/asyncapi.json``), which the contract tests keep in step with the code.

The AsyncAPI document is built here from msgspec's JSON Schemas rather than by faststream: its
generator takes payloads from pydantic models and channels from its own subscribers, and our
events are msgspec Structs consumed by our own JetStream runners, so it would need a pydantic
copy of every contract (two sources of truth) and a broker object that never runs.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import CollectorRegistry

from contracts import EVENT_TYPES
from contracts.envelope import Envelope
from libs.config import EventLogSettings
from libs.observability.metrics import ProjectionMetrics
from libs.projections.apply import Projection
from libs.runtime.service import ServiceDefinition, ServiceRuntime
from services.bus import event_owners
from services.targets import CONTROL_PLANE

ROOT = Path(__file__).resolve().parent.parent
EVENTS_DOC = ROOT / "docs" / "events.md"
ASYNCAPI_DOC = ROOT / "contracts" / "asyncapi.json"


@dataclass(frozen=True)
class Consumer:
    """One projection or reactor reading an event type."""

    service: str
    name: str
    kind: str  # "projection" (rebuilt by replay) or "reactor" (answers with events)


@dataclass(frozen=True)
class EventEntry:
    """One event type: its owner, the files of the owner that construct it, its consumers."""

    type: str
    version: int
    owner: str
    emitted_in: tuple[str, ...]
    consumers: tuple[Consumer, ...]


def constructions(package: Path, names: Iterable[str]) -> dict[str, set[str]]:
    """For each event class name in ``names``, the files under ``package`` that call it."""
    wanted = set(names)
    found: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name in wanted:
                found.setdefault(name, set()).add(path.relative_to(ROOT).as_posix())
    return found


def _throwaway_key() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem.decode()


def listing_runtime(definition: ServiceDefinition) -> ServiceRuntime:
    """A runtime of the service with its settings' defaults, never started: enough to make its
    reactor tables and routes, to read what they declare."""
    registry = CollectorRegistry()
    settings = definition.settings_type()
    if hasattr(settings, "license_private_key"):
        # Licensing's reactors are made with its signer: give them a throwaway key (the table
        # is read here, never run).
        settings = msgspec.structs.replace(settings, license_private_key=_throwaway_key())
    return ServiceRuntime(
        definition=definition,
        settings=settings,
        metrics=ProjectionMetrics(registry),
        registry=registry,
    )


def consumers_of(definition: ServiceDefinition) -> list[tuple[Projection, str]]:
    """The service's projections and reactors, each with its kind (reactor tables are made from
    a runtime: their handlers reach the service's store and settings)."""
    runtime = listing_runtime(definition)
    return [
        *((p, "projection") for p in definition.projections),
        *((r, "reactor") for r in definition.reactors(runtime)),
    ]


def catalogue(definitions: Sequence[ServiceDefinition] | None = None) -> list[EventEntry]:
    """Every event type of the contracts, in name order."""
    definitions = list(definitions or CONTROL_PLANE.values())
    owners = event_owners(definitions)
    sites: dict[str, set[str]] = {}
    readers: dict[str, list[Consumer]] = {}
    for definition in definitions:
        package = ROOT / "services" / definition.name
        classes = {EVENT_TYPES[t].__name__: t for t in definition.emitted_types}
        for name, files in constructions(package, classes).items():
            sites.setdefault(classes[name], set()).update(files)
        for projection, kind in consumers_of(definition):
            for event_type in projection.event_types:
                readers.setdefault(event_type, []).append(
                    Consumer(definition.name, projection.name, kind)
                )
    return [
        EventEntry(
            type=event_type,
            version=cls.VERSION,
            owner=owners[event_type],
            emitted_in=tuple(sorted(sites.get(event_type, ()))),
            consumers=tuple(readers.get(event_type, ())),
        )
        for event_type, cls in sorted(EVENT_TYPES.items())
    ]


def markdown(entries: Sequence[EventEntry]) -> str:
    """The catalogue as the Markdown page ``docs/events.md``."""
    lines = [
        "# Events: who emits, who consumes",
        "",
        "Generated by `python -m services.catalogue --write` from each service's declarations",
        "(`emits`, projections, reactors); the contract tests fail when it is out of date.",
        "A projection is a read model (rebuilt by `iotistic replay`); a reactor answers events",
        "with events of its own.",
        "",
        "| Event | v | Emitted by | Files that construct it | Consumed by |",
        "|---|---|---|---|---|",
    ]
    for entry in entries:
        files = "<br>".join(f"`{f}`" for f in entry.emitted_in) or "—"
        readers = "<br>".join(f"{c.service}: {c.name} ({c.kind})" for c in entry.consumers) or "—"
        lines.append(f"| `{entry.type}` | {entry.version} | {entry.owner} | {files} | {readers} |")
    return "\n".join(lines) + "\n"


def asyncapi(
    entries: Sequence[EventEntry], settings: EventLogSettings | None = None
) -> dict[str, Any]:
    """The log as an AsyncAPI 3.0 document: a channel per event type (its NATS subject, keyed by
    the thing it is about), a message with the envelope's headers and the event's payload, a
    ``send`` operation for its owner and a ``receive`` for each consumer."""
    settings = settings or EventLogSettings()
    (envelope,), shared = msgspec.json.schema_components(
        [Envelope], ref_template="#/components/schemas/{name}"
    )
    schemas: dict[str, Any] = dict(shared)
    channels: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for entry in entries:
        cls = EVENT_TYPES[entry.type]
        (payload,), components = msgspec.json.schema_components(
            [cls], ref_template="#/components/schemas/{name}"
        )
        schemas.update(components)
        messages[entry.type] = {
            "name": entry.type,
            "title": f"{entry.type} v{entry.version}",
            "summary": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
            "contentType": "application/json",
            "payload": {
                "description": "The envelope; its `data` is the event body below.",
                "allOf": [envelope, {"properties": {"data": payload}}],
            },
        }
        channels[entry.type] = {
            "address": f"{settings.events_subject_prefix}.{entry.type}.{{key}}",
            "description": f"Owned by {entry.owner}; on stream {settings.events_stream}.",
            "parameters": {"key": {"description": "The customer (or job) the event is about."}},
            "messages": {entry.type: {"$ref": f"#/components/messages/{entry.type}"}},
        }
        ref = {"$ref": f"#/channels/{entry.type}"}
        operations[f"{entry.owner}.emits.{entry.type}"] = {
            "action": "send",
            "channel": ref,
            "summary": f"{entry.owner} appends {entry.type}",
        }
        for consumer in entry.consumers:
            operations[f"{consumer.service}.{consumer.name}.{entry.type}"] = {
                "action": "receive",
                "channel": ref,
                "summary": f"{consumer.service}'s {consumer.kind} {consumer.name}",
            }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Iotistic event log",
            "version": "1",
            "description": "Every event on the JetStream log, its owner and its consumers.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": dict(sorted(schemas.items()))},
    }


def asyncapi_json(entries: Sequence[EventEntry]) -> str:
    """The AsyncAPI document as committed: indented, keys in a stable order."""
    return json.dumps(asyncapi(entries), indent=2) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the catalogue, or (``--write``) refresh docs/events.md and contracts/asyncapi.json."""
    parser = argparse.ArgumentParser(prog="python -m services.catalogue", description=__doc__)
    parser.add_argument(
        "--write", action="store_true", help="refresh docs/events.md and contracts/asyncapi.json"
    )
    args = parser.parse_args(argv)
    entries = catalogue()
    if not args.write:
        sys.stdout.write(markdown(entries))
        return 0
    EVENTS_DOC.write_text(markdown(entries))
    ASYNCAPI_DOC.write_text(asyncapi_json(entries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
