"""Settings read from environment variables once at start, validated with a clear message.

Each service declares one frozen msgspec Struct of settings. Every field maps to an environment
variable of the same name in upper case (``nats_url`` ← ``NATS_URL``); a field's default is used
when the variable is absent. Values are converted from strings by msgspec (ints, floats, bools,
literals, constrained strings), and the first bad value is reported by its variable name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Literal, TypeVar

import msgspec
from msgspec import Meta

T = TypeVar("T", bound=msgspec.Struct)

PostgresUrl = Annotated[
    str,
    Meta(pattern=r"^postgres(ql)?://", description="postgresql://user:password@host:port/database"),
]
NatsUrl = Annotated[
    str,
    Meta(pattern=r"^(nats|tls)://", description="nats://host:port, comma-separated for a cluster"),
]
Port = Annotated[int, Meta(ge=1, le=65535)]
PositiveInt = Annotated[int, Meta(ge=1)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
Identifier = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]{0,40}$")]
SubjectToken = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")]
StreamName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the environment variable."""


class EventLogSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Where the event log lives and how its stream is declared."""

    nats_url: NatsUrl = "nats://127.0.0.1:4222"
    # A folder of bus passwords, one file per user (libs/eventlog/bus_auth.py): each service
    # connects as itself, the operator's tools as `operator`. Unset: connect without credentials,
    # for a NATS server that asks for none (not one of ours: up, compose and the chart all ask).
    nats_credentials_dir: str | None = None
    events_stream: StreamName = "IOTISTIC_EVENTS"
    events_subject_prefix: SubjectToken = "iotistic.events"
    # Three replicas in production (ARCHITECTURE.md); one is all a single server can hold.
    events_replicas: Annotated[int, Meta(ge=1, le=5)] = 1
    # 0 = unlimited. The log is the source of truth, so limits refuse new writes, never drop old.
    events_max_bytes: NonNegativeInt = 0
    events_max_age_seconds: NonNegativeInt = 0
    events_duplicate_window_seconds: PositiveInt = 900


class ServiceSettings(EventLogSettings, frozen=True, kw_only=True):
    """Settings every control-plane process needs: its database, the log, HTTP and telemetry."""

    database_url: PostgresUrl = "postgresql://postgres@127.0.0.1:5432/iotistic"
    http_host: str = "0.0.0.0"  # noqa: S104 - a service in a pod listens on all interfaces
    http_port: Port = 8080
    db_pool_min: NonNegativeInt = 1
    db_pool_max: PositiveInt = 10
    # A projection further behind the stream than this many events makes the service not ready.
    projection_max_lag: PositiveInt = 1000
    # A projection behind the stream whose checkpoint has not moved for this long is stalled:
    # not ready, however small its lag (a dead consumer falls behind by one event at a time).
    projection_stall_seconds: PositiveInt = 30
    projection_batch_size: Annotated[int, Meta(ge=1, le=1000)] = 100
    projection_ack_wait_seconds: PositiveInt = 30
    # Attempts at one event before it is parked; connection errors are retried and never count.
    projection_max_attempts: PositiveInt = 3
    log_level: LogLevel = "INFO"
    otel_exporter: Literal["none", "console", "otlp"] = "none"
    # Bearer token for admin routes; unset closes them. `iotistic up` generates one.
    admin_token: Annotated[str, Meta(min_length=32)] | None = None
    # Signs customers' session tokens (signup issues them, every service checks them); unset
    # closes customer routes. `iotistic up` generates one.
    session_secret: Annotated[str, Meta(min_length=32)] | None = None
    session_ttl_seconds: Annotated[int, Meta(ge=60, le=86400)] = 3600
    # Wraps the per-customer keys that seal personal data in events (libs/sealing/vault.py);
    # never stored with them. `iotistic up` generates one; unset, no signup can be sealed.
    data_keys_master_key: Annotated[str, Meta(min_length=32)] | None = None


_FIELD_IN_PATH = re.compile(r"at `\$\.([A-Za-z0-9_]+)`")


def load_settings(cls: type[T], environ: Mapping[str, str] | None = None) -> T:
    """Build ``cls`` from environment variables, raising ``ConfigError`` naming the bad one."""
    env = os.environ if environ is None else environ
    raw: dict[str, str] = {}
    for name in cls.__struct_fields__:
        value = env.get(name.upper())
        if value is not None and value != "":
            raw[name] = value
    try:
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(str(exc), raw)) from None


def _explain(message: str, raw: Mapping[str, str]) -> str:
    match = _FIELD_IN_PATH.search(message)
    if match is None:
        return f"invalid configuration: {message}"
    field = match.group(1)
    reason = message[: match.start()].strip().rstrip("-").strip()
    value = raw.get(field)
    # URLs carry passwords and keys are secrets: name the variable, never echo its value.
    secret = any(word in field for word in ("url", "secret", "key", "password", "token"))
    shown = "" if value is None or secret else f" (got {value!r})"
    return f"{field.upper()}: {reason}{shown}"
