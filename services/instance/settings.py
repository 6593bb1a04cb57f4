"""Settings of a customer instance, given by whoever runs it (the provisioner's backends)."""

from __future__ import annotations

import secrets
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from contracts.credentials import derived_secret
from libs.config import LogLevel, Port, PostgresUrl


class InstanceSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Whose instance this is, its database, its license and where to check it."""

    instance_customer_id: Annotated[str, Meta(min_length=1)]
    database_url: PostgresUrl
    # The license JWT: a file (re-read on SIGHUP, as the backends update it) or the value.
    license_file: str | None = None
    license_jwt: str | None = None
    # The control plane's JWKS, fetched at start and when a license names an unknown key.
    license_jwks_url: str
    license_issuer: str = "iotistic-licensing"
    # The control plane's signup, which vouches for customers' session tokens (GET
    # /api/customers/me) and checks the sign-ins the dashboard relays (POST
    # /api/customers/login): the whole control plane locally, its signup Service in Kubernetes.
    control_plane_url: str = "http://127.0.0.1:8080"
    # The broker: the instance's own client (ingest) and, to make device credentials, its
    # dynamic-security admin (the local backend's shared broker; a pod's own in Kubernetes).
    mqtt_host: str = "127.0.0.1"
    mqtt_port: Port = 1883
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    # The client id the ingest client is bound to on the broker: random, kept with its
    # password by the backends. Unset: one derived from the password (never the customer id,
    # which is no secret).
    mqtt_client_id: Annotated[str, Meta(min_length=8, max_length=128)] | None = None
    mqtt_admin_username: str | None = None
    mqtt_admin_password: str | None = None
    # Where devices connect, as URLs (comma-separated; mqtt://, mqtts://, ws:// or wss://),
    # told to each device at registration. Unset: mqtt://MQTT_HOST:MQTT_PORT.
    mqtt_public_urls: str = ""
    # Readings are written in batches: at this many rows, or after this long.
    ingest_batch_rows: Annotated[int, Meta(ge=1, le=100_000)] = 5000
    ingest_flush_seconds: Annotated[float, Meta(gt=0, le=10)] = 0.2
    # How long ingest may be off the broker (a reconnect takes about a second) before the
    # instance is not ready: its devices' readings are then only waiting at the broker.
    ingest_broker_grace_seconds: Annotated[float, Meta(gt=0, le=3600)] = 2.0
    # Signs the browser's address on the sign-ins the dashboard relays to the control plane
    # (the provisioner derives it for this customer); unset, they count against ours.
    login_relay_key: str | None = None
    # Proxies in front of the instance (the ingress) that append to X-Forwarded-For.
    trusted_proxy_hops: Annotated[int, Meta(ge=0, le=5)] = 0
    # Usage goes to billing every so often with this instance's own token, at
    # ``<USAGE_URL>/api/instances/<customer>/usage``: billing's base URL as the instance reaches
    # it (its own Service in Kubernetes). Unset: CONTROL_PLANE_URL (one address for everything).
    usage_url: str | None = None
    usage_token: str | None = None
    usage_report_seconds: Annotated[float, Meta(gt=0, le=86400)] = 300.0
    # Opens /metrics and the detail of /health/ready to monitoring (Prometheus, the
    # provisioner); derived by the provisioner. Unset: /metrics needs the customer's session.
    monitoring_token: Annotated[str, Meta(min_length=32)] | None = None
    # Networks (comma-separated CIDRs) that alert webhooks may reach although they are
    # loopback, private, link-local or reserved; unset: only public addresses.
    alert_webhook_allowed_cidrs: str = ""
    http_host: str = "127.0.0.1"
    http_port: Port = 8080
    log_level: LogLevel = "INFO"
    # Where its spans go, as for the control plane's processes: none (made and propagated, not
    # sent; no span per request), console, or otlp (the standard OTEL_EXPORTER_OTLP_* variables).
    otel_exporter: Literal["none", "console", "otlp"] = "none"
    # The trace the process was started in (W3C trace context: the provisioner's deploy step),
    # which its first start (the span ``instance start``) continues. Not checked here: one the
    # propagator cannot read starts a trace of its own rather than keep the instance down.
    traceparent: str | None = None
    tracestate: str | None = None


def ingest_client_id(settings: InstanceSettings) -> str:
    """The client id of the instance's ingest client on the broker (it is bound to it)."""
    if settings.mqtt_client_id:
        return settings.mqtt_client_id
    secret = (settings.mqtt_password or "").encode()
    return (
        f"instance-{derived_secret(secret, 'mqtt-client-id', settings.instance_customer_id)[:32]}"
    )


def dashboard_csrf_key(settings: InstanceSettings) -> bytes:
    """The key the dashboard's CSRF tokens are signed with, derived from a secret the instance
    holds already (nothing more to provision). Given none (a bare local run), a random key of
    the process: the page then fetches a new token after a restart."""
    for secret in (
        settings.monitoring_token,
        settings.usage_token,
        settings.login_relay_key,
        settings.mqtt_admin_password,
        settings.mqtt_password,
    ):
        if secret:
            return derived_secret(
                secret.encode(), "dashboard-csrf", settings.instance_customer_id
            ).encode()
    return secrets.token_bytes(32)
