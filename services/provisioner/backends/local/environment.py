"""What an instance process is started with: its command, and an environment of its own (no
secret of the provisioner's beyond the shared broker's admin and, where spans go to a
collector that wants one, its OTLP headers)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from contracts.credentials import instance_usage_token, login_relay_key
from services.provisioner.backends.local.processes import MARKER
from services.provisioner.settings import ProvisionerSettings

# What an instance inherits from the provisioner's environment; nothing else (no secrets).
INHERITED = ("PATH", "LANG", "LC_ALL", "TZ", "HOME", "VIRTUAL_ENV", "PYTHONPATH", "TMPDIR")
# Where its spans go, as the provisioner's do: the standard OTLP exporter's variables (its
# endpoint, headers, protocol, timeouts; OTEL_EXPORTER_OTLP_HEADERS may hold a collector's
# token, given to the instance process as to the provisioner and never logged) and the batch
# processor's.
INHERITED_PREFIXES = ("OTEL_EXPORTER_OTLP_", "OTEL_BSP_")


@dataclass(frozen=True)
class InstanceIdentity:
    """Who the instance is, to its database and broker: the names and credentials derived for
    the customer."""

    customer_id: str
    name: str
    database_url: str | None
    mqtt_password: str
    mqtt_client_id: str
    monitoring_token: str


def instance_command(settings: ProvisionerSettings) -> list[str]:
    """The command an instance runs: ``LOCAL_INSTANCE_COMMAND``, or the instance target."""
    if settings.local_instance_command:
        return settings.local_instance_command.split()
    # ``iotistic run --target instance`` without the command's other targets and tools,
    # which every instance would otherwise carry (about 12 MiB each).
    # -P: the provisioner's working folder is not put first on the instance's path.
    return [sys.executable, "-P", "-m", "services.instance"]


def instance_environment(
    settings: ProvisionerSettings, who: InstanceIdentity, port: int, license_file: Path
) -> dict[str, str]:
    """The instance's whole environment: what it inherits, its marker, and its settings."""
    customer_id = who.customer_id
    env = {k: os.environ[k] for k in INHERITED if k in os.environ}
    env.update({k: v for k, v in os.environ.items() if k.startswith(INHERITED_PREFIXES)})
    env.update(
        {
            MARKER: customer_id,
            "INSTANCE_CUSTOMER_ID": customer_id,
            "DATABASE_URL": who.database_url or "",
            "LICENSE_FILE": str(license_file),
            "LICENSE_JWKS_URL": settings.license_jwks_url,
            "HTTP_HOST": settings.local_instance_host,
            "HTTP_PORT": str(port),
            "MQTT_HOST": settings.mqtt_host,
            "MQTT_PORT": str(settings.mqtt_port),
            "MQTT_USERNAME": who.name,
            "MQTT_PASSWORD": who.mqtt_password,
            "MQTT_CLIENT_ID": who.mqtt_client_id,
            "MONITORING_TOKEN": who.monitoring_token,
            "ALERT_WEBHOOK_ALLOWED_CIDRS": settings.alert_webhook_allowed_cidrs,
            # The shared broker's admin makes device credentials: on one machine the
            # instances share the provisioner's trust (in Kubernetes each has its own broker).
            "MQTT_ADMIN_USERNAME": settings.mqtt_admin_username or "",
            "MQTT_ADMIN_PASSWORD": settings.mqtt_admin_password or "",
            "CONTROL_PLANE_URL": settings.control_plane_url,
            "USAGE_REPORT_SECONDS": str(settings.instance_usage_report_seconds),
            "USAGE_TOKEN": instance_usage_token(settings.usage_secret, customer_id)
            if settings.usage_secret
            else "",
            "LOGIN_RELAY_KEY": login_relay_key(settings.login_relay_secret, customer_id)
            if settings.login_relay_secret
            else "",
            "LOG_LEVEL": "WARNING",
            "OTEL_EXPORTER": settings.otel_exporter,
        }
    )
    return env
