"""Who owns which event, and the bus users that follow from it.

Each service declares the events it emits next to its definition (``ServiceDefinition.emits``);
this module reads those declarations, checks that every event type has exactly one owner, and
turns them into the NATS users and permissions the server enforces (``libs/eventlog/bus_auth.py``).
The embedded platform, the test harness, ``iotistic bus`` (for compose and the chart) all use it,
so what the server allows is always what the code declares.
"""

from __future__ import annotations

from collections.abc import Iterable

from contracts import EVENT_TYPES
from libs.config import EventLogSettings
from libs.eventlog.bus_auth import BusUser, operator_user, service_user
from libs.runtime.service import ServiceDefinition
from services.targets import CONTROL_PLANE


class OwnershipError(ValueError):
    """An event type has no owning service, or more than one."""


def event_owners(definitions: Iterable[ServiceDefinition] | None = None) -> dict[str, str]:
    """Each event type and the one service that may append it."""
    owners: dict[str, str] = {}
    for definition in definitions or CONTROL_PLANE.values():
        for event_type in definition.emitted_types:
            if event_type in owners:
                raise OwnershipError(
                    f"{event_type} is emitted by both {owners[event_type]} and {definition.name}"
                )
            owners[event_type] = definition.name
    missing = sorted(set(EVENT_TYPES) - set(owners))
    if missing:
        raise OwnershipError(f"no service owns {', '.join(missing)}")
    return dict(sorted(owners.items()))


def bus_users(
    settings: EventLogSettings,
    *,
    stream: str | None = None,
    prefix: str | None = None,
) -> list[BusUser]:
    """The bus users of the control plane (one per service) and the operator's.

    ``stream`` and ``prefix`` default to the settings' (a test harness serving many streams on
    one server passes NATS wildcards, such as ``*`` and ``*.events``).
    """
    event_owners()  # refuse to make permissions from declarations that contradict each other
    stream = stream or settings.events_stream
    prefix = prefix or settings.events_subject_prefix
    users = [
        service_user(
            definition.name,
            stream=stream,
            prefix=prefix,
            emits=definition.emitted_types,
            consumers=definition.consumers,
        )
        for definition in CONTROL_PLANE.values()
    ]
    users.append(operator_user())
    return users
