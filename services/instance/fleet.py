"""The topics and broker rights of devices that registered themselves (fleet provisioning).

Such a device runs the original Iotistic agent and keeps its wire format: everything it
publishes or receives is under ``iot/device/<uuid>/``, where ``<uuid>`` is the id it chose at
registration. Its broker client (``iot-<uuid>``, bound to the client id ``<uuid>``) may

- publish under ``iot/device/<uuid>/#`` except its desired configuration (``.../config``,
  which only the instance writes);
- subscribe to and receive only ``iot/device/<uuid>/#``.

The instance's own clients (ingest, and the publisher of desired configurations) hold the
customer's fleet role, ``<ingest user>-fleet``: for each of the customer's fleet devices the
right to receive ``iot/device/<uuid>/#`` and to publish its ``.../config``, and a subscription
pattern ``iot/device/+/#`` that on its own receives nothing (receiving is denied everywhere
else). On a broker shared by several customers a uuid is therefore exclusive: the broker
client ``iot-<uuid>`` exists once, and its text name says whose it is.
"""

from __future__ import annotations

import re

from libs.mqtt.dynsec import FLEET_ROOT, Acl, owner_text

__all__ = ["owner_text"]

ROOT = FLEET_ROOT
# Topic-safe and long enough not to be guessed by chance: a UUID (with or without dashes) or
# any other id of 8 to 64 letters, digits, ``-`` and ``_``.
UUID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{7,63}$")
# What the instance's clients subscribe to; the fleet role's receive ACLs choose the devices.
SUBSCRIPTION = f"{ROOT}/+/#"


def valid_uuid(uuid: str) -> bool:
    """Whether ``uuid`` may name a device (and so a topic level)."""
    return bool(UUID_PATTERN.fullmatch(uuid))


def device_root(uuid: str) -> str:
    """``iot/device/<uuid>``."""
    return f"{ROOT}/{uuid}"


def config_topic(uuid: str) -> str:
    """Where the device's desired configuration is published, retained."""
    return f"{device_root(uuid)}/config"


def reported_topic(uuid: str) -> str:
    """Where the device reports the configuration it applied."""
    return f"{device_root(uuid)}/config/reported"


def sensor_topic(uuid: str, name: str) -> str:
    """``iot/device/<uuid>/sensor/<name>``: readings batches and heartbeats."""
    return f"{device_root(uuid)}/sensor/{name}"


def broker_username(uuid: str) -> str:
    """The device's broker client: one per uuid on the broker."""
    return f"iot-{uuid}"


def fleet_role(ingest_username: str) -> str:
    """The role of the instance's own clients for its fleet devices."""
    return f"{ingest_username}-fleet"


def device_acls(uuid: str) -> list[Acl]:
    """What a fleet device may do: publish, subscribe and receive under its own root, never
    publish its desired configuration, and nothing anywhere else."""
    own = f"{device_root(uuid)}/#"
    return [
        Acl("publishClientSend", config_topic(uuid), allow=False, priority=1),
        Acl("publishClientSend", own),
        Acl("subscribePattern", own),
        Acl("publishClientReceive", own),
        Acl("subscribePattern", "#", allow=False, priority=-1),
        Acl("publishClientReceive", "#", allow=False, priority=-1),
    ]


def reader_acls(uuid: str) -> list[Acl]:
    """What the customer's fleet role holds for one of its devices: receive everything it
    publishes, and publish its desired configuration."""
    return [
        Acl("publishClientReceive", f"{device_root(uuid)}/#"),
        Acl("publishClientSend", config_topic(uuid)),
    ]


def fleet_role_acls(uuids: list[str]) -> list[Acl]:
    """The fleet role with these devices: the subscription pattern, and each device's rights.
    The ingest role's own ``publishClientReceive #`` deny (priority -1) covers the rest."""
    acls = [Acl("subscribePattern", SUBSCRIPTION)]
    for uuid in uuids:
        acls.extend(reader_acls(uuid))
    return acls


def uuid_of(topic: str) -> str | None:
    """The uuid of a topic under ``iot/device/``, or None."""
    parts = topic.split("/")
    if len(parts) >= 4 and f"{parts[0]}/{parts[1]}" == ROOT and valid_uuid(parts[2]):
        return parts[2]
    return None
