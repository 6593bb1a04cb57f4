"""Who may do what on the event bus: one NATS user per party, with subject permissions.

Every party that connects to NATS has a user of its own and a password kept in a credentials
folder (one file per user, holding that user's password, owner-only). The server's
configuration holds only bcrypt hashes of those passwords and, for each user, the subjects it
may publish to and subscribe to; anything not allowed is refused by the server itself:

- a **service** may append only the event types it owns (``<prefix>.<EventType>.*``), read the
  stream's info, and create, read, pull from, acknowledge and delete only the durable consumers
  named after its own projections and reactors. It cannot create other consumers, read messages
  by sequence or subject (``STREAM.MSG.GET``, ``DIRECT.GET``), or create, change, purge or delete
  streams. Its replies come to an inbox of its own (``_INBOX.<user>.>``), which no other user may
  subscribe to.
- the **operator** (the ``iotistic`` command's tools: ``events``, ``replay``, stream set-up) may use
  the whole JetStream API, but may not append events: an operator decides, services record.

What a consumer *filters* is not checked by the server: NATS cannot match the filters of a
multi-filter consumer against permissions (nats-server discussion 4280). A service's
credentials therefore let it read any event through one of its own consumers; they do not let it
write another service's events, disturb another service's consumers, or change the log.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from libs.secret_files import secret_file

OPERATOR = "operator"
"""The user of the operators' tools."""

_USER = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
# nats-server accepts bcrypt hashes with this prefix; cost 11 is what `nats server passwd` uses.
_BCRYPT_PREFIX = b"2a"
BCRYPT_COST = 11


class BusAuthError(ValueError):
    """A user, permission or credential is not well formed."""


@dataclass(frozen=True)
class BusUser:
    """A NATS user and the subjects it may publish and subscribe to."""

    name: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def __post_init__(self) -> None:
        if not _USER.match(self.name):
            raise BusAuthError(f"bus user {self.name!r}: 1-32 of a-z 0-9 _ -, a letter first")


def inbox_prefix(user: str) -> str:
    """The inbox prefix a user's connection must use: replies to it arrive under it alone."""
    return f"_INBOX.{user}"


def service_user(
    name: str,
    *,
    stream: str,
    prefix: str,
    emits: Iterable[str],
    consumers: Iterable[str],
) -> BusUser:
    """A service's user: appends only ``emits``, consumes only through ``consumers``."""
    api = "$JS.API"
    publish = [f"{prefix}.{event_type}.*" for event_type in sorted(set(emits))]
    publish.append(f"{api}.STREAM.INFO.{stream}")
    for consumer in sorted(set(consumers)):
        publish += [
            f"{api}.CONSUMER.CREATE.{stream}.{consumer}",
            # The form that names a single filter subject in the request subject.
            f"{api}.CONSUMER.CREATE.{stream}.{consumer}.>",
            f"{api}.CONSUMER.INFO.{stream}.{consumer}",
            f"{api}.CONSUMER.DELETE.{stream}.{consumer}",
            f"{api}.CONSUMER.MSG.NEXT.{stream}.{consumer}",
            f"$JS.ACK.{stream}.{consumer}.>",
        ]
    return BusUser(name, tuple(publish), (f"{inbox_prefix(name)}.>",))


def operator_user() -> BusUser:
    """The operator's user: the whole JetStream API, no appends of events."""
    return BusUser(OPERATOR, ("$JS.API.>",), (f"{inbox_prefix(OPERATOR)}.>",))


def superuser(name: str) -> BusUser:
    """A user allowed everything: only for a test harness that injects events of any type."""
    return BusUser(name, (">",), (">",))


def password_hash(password: str, cost: int = BCRYPT_COST) -> str:
    """A bcrypt hash of ``password`` in the form nats-server checks."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost, prefix=_BCRYPT_PREFIX)).decode()


def authorization_block(users: Sequence[BusUser], hashes: Mapping[str, str]) -> str:
    """The ``authorization`` block of a nats-server configuration for ``users``.

    ``hashes`` maps each user to the bcrypt hash of its password; no password is written.
    Strings are written as JSON strings, which the NATS configuration format reads as such.
    """
    lines = ["authorization {", "  users: ["]
    for user in users:
        if user.name not in hashes:
            raise BusAuthError(f"no password hash for bus user {user.name}")
        lines += [
            "    {",
            f"      user: {json.dumps(user.name)}",
            f"      password: {json.dumps(hashes[user.name])}",
            "      permissions: {",
            f"        publish: {{ allow: {json.dumps(list(user.publish))} }}",
            f"        subscribe: {{ allow: {json.dumps(list(user.subscribe))} }}",
            "      }",
            "    }",
        ]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


class Credentials:
    """A folder of bus passwords, one file per user (``<folder>/<user>``), owner-only."""

    def __init__(self, folder: Path) -> None:
        """Credentials kept in ``folder``."""
        self.folder = Path(folder)

    def path(self, user: str) -> Path:
        """Where ``user``'s password is kept."""
        if not _USER.match(user):
            raise BusAuthError(f"bus user {user!r} is not a user name")
        return self.folder / user

    def has(self, user: str) -> bool:
        """Whether the folder holds a password for ``user``."""
        return self.path(user).is_file()

    def password(self, user: str) -> str:
        """``user``'s password; ``BusAuthError`` names the file when it is missing."""
        path = self.path(user)
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise BusAuthError(f"no bus password for {user} at {path}: {exc.strerror}") from None
        if not value:
            raise BusAuthError(f"the bus password file {path} is empty")
        return value

    def ensure(self, users: Iterable[str]) -> None:
        """Make a random password for every user that has none, or an empty file (0600, in a
        0700 folder); tighten the modes of what is there where they are looser."""
        for user in users:
            path = self.path(user)
            if path.is_file() and not path.read_text().strip():
                path.unlink()  # an empty file is no password: make one
            secret_file(path, nbytes=32)
            _owner_only(path, 0o600)
        _owner_only(self.folder, 0o700)

    def hashes(self, users: Iterable[str], cost: int = BCRYPT_COST) -> dict[str, str]:
        """bcrypt hashes of the users' passwords, for the server's configuration."""
        return {user: password_hash(self.password(user), cost) for user in users}


def _owner_only(path: Path, mode: int) -> None:
    """Take group and other rights away from ``path``, where its file system lets us."""
    current = path.stat().st_mode & 0o777
    if current & 0o077:
        # A read-only mount (compose's secrets) keeps its modes; its owner chose them.
        with contextlib.suppress(OSError):
            path.chmod(mode)
