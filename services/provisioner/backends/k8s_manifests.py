"""The Kubernetes objects of one customer's instance, as plain dicts, in the order they apply.

Namespace ``customer-<id>`` with a ResourceQuota (4 CPU / 4Gi) and LimitRange; NetworkPolicies
that isolate it (in: its own pods, and the shared Gateway's Envoy proxies to the instance's
HTTP port and the broker's WebSockets port only; out: its own pods and the cluster DNS), and
one that lets the instance pods, and only them, out to the control plane's HTTP targets
(signup, billing, licensing: their HTTP port only, never NATS or Postgres) and to public HTTPS
(alert webhooks), never to private, loopback, link-local, shared or reserved addresses nor the
cluster's own networks; Secrets for the license, the database, the broker and monitoring;
Postgres as a StatefulSet whose data volume is sized by the plan (``k8s_storage``), a "backups"
volume and the daily backup CronJob with its scripts (``k8s_backups``); Mosquitto on 1883 and
9001, with the platform's message size and queue limits; the instance Deployment and Service;
an Envoy Gateway BackendTrafficPolicy (a request rate per client address, connections sized by
the licensed devices) and an HTTPRoute ``<id>.<BASE_DOMAIN>`` on the chart's shared Gateway
(Gateway API; one wildcard certificate there, none per customer), which also carries MQTT over
WebSockets at ``wss://<id>.<BASE_DOMAIN>/mqtt`` to the broker: the way devices outside the
cluster reach it. ``render`` is pure: the same customer, license and password give the same
objects, so applying them again (a retried job, an update) converges. A new license changes the
instance pod template's annotation, which rolls the Deployment.

Hardening: the namespace enforces Pod Security "restricted" and is labelled a tenant; every
container runs non-root with a read-only root, no capabilities and RuntimeDefault seccomp, no
pod gets a service-account token; Postgres and Mosquitto images are pinned by digest. The
instance connects to Postgres as a role of its own (owner of its database, no other power);
the superuser's password is in a Secret only the Postgres pod mounts. Passwords rotate by the
customer's credentials generation (recorded on the Namespace); a hash of them on each pod
template rolls the pods that use them. The instance Deployment recreates its one pod rather
than rolling, because two pods would share one MQTT client id.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from libs.servers.mosquitto import MAX_CONNECTIONS, broker_limits, listener_limits
from services.provisioner.backends import k8s_backups
from services.provisioner.backends.base import BackendError, InstanceSpec
from services.provisioner.backends.k8s_storage import (
    BACKUP_CLAIM,
    DATA_CLAIM,
    StoragePolicy,
    TenantStorage,
    tenant_storage,
    volume_claims,
)

PART_OF = "iotistic"
MQTT_ADMIN = "admin"
MQTT_INGEST = "instance"
DYNSEC_FILE = "/mosquitto/data/dynamic-security.json"
BROKER_LIMITS = "\n".join(broker_limits())
LISTENER_LIMITS = "\n".join(listener_limits())
MOSQUITTO_CONF = f"""per_listener_settings false
allow_anonymous false
persistence true
persistence_location /mosquitto/data/
autosave_interval 60
{BROKER_LIMITS}
listener 1883
{LISTENER_LIMITS}
listener 9001
protocol websockets
{LISTENER_LIMITS}
plugin /usr/lib/mosquitto_dynamic_security.so
plugin_opt_config_file {DYNSEC_FILE}
"""
INSTANCE_PORT = 8080
MQTT_PATH = "/mqtt"
MQTT_WEBSOCKETS_PORT = 9001
# The dashboard's server-sent events: open as long as the page is.
LIVE_STREAM_PATH = "/api/stream"
# A device's readings as CSV, up to a million rows streamed: longer than an ordinary request.
EXPORT_PATH = r"/api/devices/[^/]+/readings\.csv"
GATEWAY_API = "gateway.networking.k8s.io"
# The shared Gateway's HTTPS listener for ``*.<base domain>`` that tenants' routes attach to.
GATEWAY_LISTENER = "tenants"
# What instances may not reach outside their namespace, although it is not the control plane:
# every private, loopback, link-local, shared, multicast and reserved range (and IPv4 in IPv6).
NOT_PUBLIC_V4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
NOT_PUBLIC_V6 = (
    "::1/128",
    "::ffff:0:0/96",
    "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215): where it carries IPv4 is the network's
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
)
# IPv6 prefixes that carry an IPv4 address (NAT64's well-known prefix, RFC 6052, in its last
# 32 bits; 6to4, RFC 3056, right after its 16): open only as far as the IPv4 address they
# carry is public, as the instance's own webhook check reads them, else a cluster with NAT64
# (IPv6-only pods) lets 64:ff9b::a9fe:a9fe through to the cloud's metadata.
IPV4_IN_IPV6 = (("64:ff9b::/96", 0), ("2002::/16", 80))
RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
    "readOnlyRootFilesystem": True,
}
# Pod Security "restricted", enforced on every tenant namespace (the chart's Gateway admits
# routes from namespaces labelled as tenants, and its admission policy requires both).
NAMESPACE_LABELS = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
    "pod-security.kubernetes.io/audit": "restricted",
    "pod-security.kubernetes.io/audit-version": "latest",
    "pod-security.kubernetes.io/warn": "restricted",
    "pod-security.kubernetes.io/warn-version": "latest",
    "iotistic.io/tenant": "true",
}
CREDENTIALS_GENERATION = "iotistic.io/credentials-generation"
# The customer a namespace was made for, as their id is (a label holds only its DNS form):
# another customer whose id maps to the same name must not be applied over them.
CUSTOMER_ANNOTATION = "iotistic.io/customer"
# Which PROVISIONER_SECRET the customer's passwords derive from (a short HMAC of it and the
# customer: it tells two secrets apart and nothing about either). An apply with another secret
# (a stale .env, a chart that made the secret anew) would give every password a value the
# broker's admin has never had: refused instead.
SECRET_FINGERPRINT = "iotistic.io/secret-fingerprint"  # noqa: S105 (a name, not a secret)
CREDENTIALS_HASH = "iotistic.io/credentials-sha256"
# Pinned by digest: a tag can be moved to other content, a digest cannot. These are the
# multi-arch index digests of postgres:18 and eclipse-mosquitto:2.0.22 as several public
# repositories pin them; Docker Hub cannot be reached from where this was written, so they
# were not checked against the registry here (`crane digest postgres:18` does it).
POSTGRES_IMAGE = (
    "postgres:18@sha256:3a82e1f56c8f0f5616a11103ac3d47e632c3938698946a7ad26da0df1334744a"
)
MOSQUITTO_IMAGE = (
    "eclipse-mosquitto:2.0@sha256:212f89e1eaeb2c322d6441b64396e3346026674db8fa9c27beac293405c32b3c"
)
_DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
# Postgres: the superuser is the image's bootstrap user, known only to the Postgres pod; the
# instance connects as a role of its own that owns its database and nothing more.
PG_SUPERUSER = "postgres"
PG_INSTANCE_ROLE = "iotistic"
PG_DATABASE = "iotistic"
PG_SECRETS_DIR = "/etc/iotistic/postgres-secrets"
PG_SCRIPTS_DIR = "/etc/iotistic/postgres-scripts"
# Run by psql as the superuser over the local socket, at the first start (initdb.d) and on
# every start after (postStart): creates the instance's role if missing, gives it the password
# of the mounted Secret (so a rotated password takes effect), takes away every power beyond
# owning its database, and keeps the superuser's password in step too. A tenant made by a
# version before this, whose instance role is the bootstrap superuser (which Postgres does not
# let lose SUPERUSER), is first moved by migrate-instance-role.sql; were it not, only the
# role's password would be kept, and the log would say so.
PG_MIGRATION_ROLE = "iotistic_migration"
PG_ENSURE_SQL = f"""\\set ON_ERROR_STOP on
SET client_min_messages = warning;
\\getenv role_password IOTISTIC_ROLE_PASSWORD
\\getenv superuser_password IOTISTIC_SUPERUSER_PASSWORD
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') AS missing \\gset
\\if :missing
CREATE ROLE :"role" LOGIN;
\\endif
SELECT oid = 10 AS legacy, :'superuser' <> :'role' AS own_superuser
  FROM pg_roles WHERE rolname = :'role' \\gset
\\if :legacy
\\echo 'iotistic: the instance role is the bootstrap superuser (a tenant made before'
\\echo '  least privilege): only its password is kept in step'
ALTER ROLE :"role" PASSWORD :'role_password';
\\else
ALTER ROLE :"role" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
  PASSWORD :'role_password';
ALTER DATABASE :"db" OWNER TO :"role";
\\endif
\\if :own_superuser
ALTER ROLE :"superuser" PASSWORD :'superuser_password';
DROP ROLE IF EXISTS {PG_MIGRATION_ROLE};
\\endif
"""
# Once, for a tenant made before the instance had a role of its own: its instance role is the
# cluster's bootstrap superuser, which Postgres does not let lose SUPERUSER. Run (by a
# temporary superuser, in the instance's database, in one transaction) it is renamed to be the
# superuser, and a new instance role gets the database and everything in it the instance made.
PG_MIGRATE_SQL = """\\set ON_ERROR_STOP on
\\getenv role_password IOTISTIC_ROLE_PASSWORD
\\getenv superuser_password IOTISTIC_SUPERUSER_PASSWORD
BEGIN;
SELECT coalesce((SELECT oid = 10 FROM pg_roles WHERE rolname = :'role'), false)
   AND NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'superuser') AS legacy \\gset
\\if :legacy
\\echo 'iotistic: giving the instance a role of its own (a tenant made before least privilege)'
ALTER ROLE :"role" RENAME TO :"superuser";
ALTER ROLE :"superuser" PASSWORD :'superuser_password';
CREATE ROLE :"role" LOGIN PASSWORD :'role_password';
ALTER DATABASE :"db" OWNER TO :"role";
SELECT set_config('iotistic.owner', :'role', true);
DO $$
DECLARE
  owner text := current_setting('iotistic.owner');
  r record;
BEGIN
  FOR r IN SELECT nspname FROM pg_namespace
      WHERE nspowner = 10 AND nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'
  LOOP
    EXECUTE format('ALTER SCHEMA %I OWNER TO %I', r.nspname, owner);
  END LOOP;
  -- Relations (indexes and owned sequences follow their tables).
  FOR r IN SELECT c.oid::regclass AS name, c.relkind FROM pg_class c
      JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE c.relowner = 10 AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
        AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
        AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                        AND d.objid = c.oid AND d.deptype IN ('a', 'i'))
  LOOP
    EXECUTE format('ALTER %s %s OWNER TO %I',
      CASE r.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
        WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'f' THEN 'FOREIGN TABLE' ELSE 'TABLE' END,
      r.name, owner);
  END LOOP;
  FOR r IN SELECT p.oid::regprocedure AS name FROM pg_proc p
      JOIN pg_namespace n ON n.oid = p.pronamespace
      WHERE p.proowner = 10 AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
  LOOP
    EXECUTE format('ALTER ROUTINE %s OWNER TO %I', r.name, owner);
  END LOOP;
  -- Types of their own (enums, domains, composites, ranges); a table's row type follows it.
  FOR r IN SELECT t.oid::regtype AS name FROM pg_type t
      JOIN pg_namespace n ON n.oid = t.typnamespace
      WHERE t.typowner = 10 AND t.typtype IN ('c', 'd', 'e', 'r')
        AND (t.typrelid = 0 OR (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c')
        AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
  LOOP
    EXECUTE format('ALTER TYPE %s OWNER TO %I', r.name, owner);
  END LOOP;
END
$$;
\\endif
COMMIT;
"""
PG_ENSURE_SH = f"""#!/bin/sh
# Keeps the instance's role in step with the mounted Secret (see ensure-instance-role.sql).
set -eu
secrets="${{IOTISTIC_POSTGRES_SECRETS:-{PG_SECRETS_DIR}}}"
scripts="${{IOTISTIC_POSTGRES_SCRIPTS:-{PG_SCRIPTS_DIR}}}"
superuser="${{POSTGRES_USER:-{PG_SUPERUSER}}}"
role="$(cat "$secrets/user")"
db="${{POSTGRES_DB:-{PG_DATABASE}}}"
export IOTISTIC_ROLE_PASSWORD IOTISTIC_SUPERUSER_PASSWORD
IOTISTIC_ROLE_PASSWORD="$(cat "$secrets/password")"
IOTISTIC_SUPERUSER_PASSWORD="$(cat "$secrets/superuser-password")"
run() {{
  psql -X -q -v ON_ERROR_STOP=1 -v role="$role" -v superuser="$superuser" -v db="$db" "$@"
}}
if ! run -U "$superuser" -d postgres -c 'SELECT 1' >/dev/null 2>&1; then
  # No such superuser: a tenant from before least privilege, whose instance role is the
  # bootstrap superuser (or the server does not answer, and this fails).
  run -U "$role" -d postgres -c 'SELECT 1' >/dev/null
  run -U "$role" -d postgres -c "CREATE ROLE {PG_MIGRATION_ROLE} SUPERUSER LOGIN" \\
    >/dev/null 2>&1 || true
  run -U {PG_MIGRATION_ROLE} -d "$db" -f "$scripts/migrate-instance-role.sql"
fi
run -U "$superuser" -d "$db" -f "$scripts/ensure-instance-role.sql"
echo "iotistic: instance role $role kept in step"
"""
# postStart: once the server answers over TCP (the first start's temporary server, which runs
# the initdb.d script, listens on its socket only: the two never race), run the ensure step.
# It never fails the container (a failed postStart would kill Postgres, perhaps in the middle
# of its first initdb); it writes why to the container's log, and the instance, refused, is
# not ready.
PG_POST_START_SH = """#!/bin/sh
# A hook's output is shown nowhere: write it to the container's log (its PID 1's stdout).
log="${IOTISTIC_LOG_TO:-/proc/1/fd/1}"
if [ -w "$log" ]; then exec >>"$log" 2>&1; fi
i=0
while [ "$i" -lt 300 ]; do
  if pg_isready -q -h 127.0.0.1 && sh "$(dirname "$0")/ensure-instance-role.sh"; then exit 0; fi
  i=$((i + 1))
  sleep 1
done
echo "iotistic: could not keep the instance role in step after 300s" >&2
"""
MQTT_ADMIN_DIR = "/etc/iotistic/mqtt-admin"
# postStart of the broker: the dynamic-security file keeps the admin's password of the first
# start. When the credentials were rotated, the Secret holds the new one and every earlier
# one (newest first, a line each): log in with the first that works and set the new, so the
# instance (which uses the new one to re-set its own ingest client's password at start) can
# administer the broker again. Every earlier one, not just the last: a rotation cut off after
# it recorded its generation, run again, skips a generation the broker never saw.
MQTT_POST_START_SH = f"""#!/bin/sh
# A hook's output is shown nowhere: write it to the container's log (its PID 1's stdout).
log="${{IOTISTIC_LOG_TO:-/proc/1/fd/1}}"
if [ -w "$log" ]; then exec >>"$log" 2>&1; fi
dir="${{IOTISTIC_MQTT_ADMIN:-{MQTT_ADMIN_DIR}}}"
port="${{IOTISTIC_MQTT_PORT:-1883}}"
user="$(cat "$dir/admin-username")"
password="$(cat "$dir/admin-password")"
earlier="$dir/admin-password-previous"
works() {{
  mosquitto_sub -h 127.0.0.1 -p "$port" -u "$user" -P "$1" -t '$SYS/broker/version' \\
    -C 1 -W 5 >/dev/null 2>&1
}}
move_from_earlier() {{
  [ -r "$earlier" ] || return 1
  while IFS= read -r previous || [ -n "$previous" ]; do
    if [ -n "$previous" ] && works "$previous"; then
      mosquitto_ctrl -h 127.0.0.1 -p "$port" -u "$user" -P "$previous" \\
        dynsec setClientPassword "$user" "$password" >/dev/null 2>&1 || true
      echo "iotistic: broker admin password rotated"
      return 0
    fi
  done < "$earlier"
  return 1
}}
i=0
while [ "$i" -lt 60 ]; do
  i=$((i + 1))
  if works "$password"; then exit 0; fi
  if move_from_earlier; then continue; fi
  sleep 1
done
echo "iotistic: no admin password of the Secret, current or earlier, works on the broker" >&2
"""
POSTGRES_SCRIPTS = {
    "ensure-instance-role.sql": PG_ENSURE_SQL,
    "migrate-instance-role.sql": PG_MIGRATE_SQL,
    "ensure-instance-role.sh": PG_ENSURE_SH,
    "post-start.sh": PG_POST_START_SH,
    # Sourced by the image's entrypoint at the first start, after initdb.
    "10-instance-role.sh": f"sh {PG_SCRIPTS_DIR}/ensure-instance-role.sh\n",
}
# Postgres answers (accepting connections, or still starting or recovering: exit 1): alive.
PG_ANSWERS = ["sh", "-c", "pg_isready -q; test $? -le 1"]


@dataclass(frozen=True)
class KubernetesSettings:
    """Cluster-specific choices for the rendered objects."""

    base_domain: str = "iotistic.cloud"
    instance_image: str = "ghcr.io/iotistic/iotistic:0.1.0"
    postgres_image: str = POSTGRES_IMAGE
    mosquitto_image: str = MOSQUITTO_IMAGE
    control_plane_namespace: str = "iotistic"
    # The control plane's pods (the chart's labels) and the HTTP port instances may reach on
    # those of ``control_plane_components``.
    control_plane_pod_labels: dict[str, str] = field(
        default_factory=lambda: {"app.kubernetes.io/name": "iotistic"}
    )
    control_plane_port: int = 8080
    # The cluster's pod and service networks, refused like the private ranges.
    cluster_cidrs: tuple[str, ...] = ()
    # Handed to instances: networks their webhooks may reach although not public.
    alert_webhook_allowed_cidrs: str = ""
    storage_class: str | None = None
    namespace_prefix: str = "customer-"
    # Where instances reach the control plane's owners of what they ask, from inside the
    # cluster (each target is a Service of its own): signup, for sign-ins and sessions
    # (CONTROL_PLANE_URL), and billing, for usage reports (USAGE_URL; empty: the same as
    # control_plane_url). Never an address of the pod itself (127.0.0.1 is the instance).
    control_plane_url: str = ""
    usage_url: str = ""
    # How often instances report their usage to billing.
    usage_report_seconds: float = 300.0
    # --- the tenants' network: the chart's shared Gateway (Gateway API) and Envoy Gateway
    # The Gateway every tenant's HTTPRoute attaches to, in control_plane_namespace, at its
    # listener GATEWAY_LISTENER (``*.<base domain>``, one wildcard certificate).
    gateway_name: str = "iotistic"
    # Where that Gateway's Envoy proxies run (Envoy Gateway's own namespace, or the Gateway's
    # in its "Gateway namespace" mode) and their pods' labels (Envoy Gateway's, on every proxy
    # whatever its Gateway): the only way into a tenant from outside its namespace.
    gateway_proxy_namespace: str = "envoy-gateway-system"
    gateway_proxy_pod_labels: dict[str, str] = field(
        default_factory=lambda: {
            "app.kubernetes.io/name": "envoy",
            "app.kubernetes.io/component": "proxy",
            "app.kubernetes.io/managed-by": "envoy-gateway",
        }
    )
    # The control plane's targets an instance calls: sign-in and /me (signup), usage (billing),
    # the license keys (licensing); never the provisioner, NATS or Postgres.
    control_plane_components: tuple[str, ...] = ("signup", "billing", "licensing")
    # The cluster DNS's pods, the only DNS a tenant may ask.
    dns_namespace: str = "kube-system"
    dns_pod_labels: dict[str, str] = field(default_factory=lambda: {"k8s-app": "kube-dns"})
    # Ports the instance's alert webhooks may use on public addresses: HTTPS only.
    webhook_ports: tuple[int, ...] = (443,)
    # The longest an ordinary request through the Gateway may take, and a CSV export (MQTT over
    # WebSockets and the dashboard's live stream have none: they last as long as the device or
    # page). Gateway API durations: "60s", "15m", "1h".
    gateway_request_timeout: str = "60s"
    gateway_export_timeout: str = "15m"
    # Render Envoy Gateway's BackendTrafficPolicy per tenant (off for another Gateway API
    # implementation: the HTTPRoute is portable, the policy is not).
    gateway_traffic_policy: bool = True
    # Requests a second one client address may make to one tenant (per Envoy replica and per
    # route rule); 0: no limit.
    gateway_requests_per_client: int = 50
    # Connections to a tenant's broker or instance an Envoy replica holds beyond one per
    # licensed device (people's browsers, API clients).
    gateway_connections_headroom: int = 100
    # Volumes sized by plan, and how many daily dumps each plan keeps (k8s_storage).
    storage: StoragePolicy = field(default_factory=StoragePolicy)
    # The backup CronJob's schedule; unset: a minute between 01:00 and 05:00 UTC by customer.
    backup_schedule: str | None = None
    # Days a deleted customer's namespace, volumes and backups are kept before the purge.
    deletion_grace_days: int = 30
    # The worker's reads in a tenant's namespace: (the reader ClusterRole, the worker's
    # ServiceAccount namespace, its name). Each namespace gets a RoleBinding of that role to
    # that ServiceAccount (``reader_binding``), the worker's only way to read what is in it.
    # None (outside the chart): no RoleBinding.
    tenant_reader: tuple[str, str, str] | None = None


def dns_label(customer_id: str) -> str:
    """The customer id as a DNS-1123 label (lower case, a-z0-9 and '-', at most 63)."""
    label = re.sub(r"[^a-z0-9-]", "-", customer_id.lower()).strip("-")
    return label[:63].rstrip("-") or "customer"


def check_customer_id(customer_id: str) -> None:
    """Refuse an id that is not its own DNS label: "Acme" and "acme", or "a_b" and "a-b",
    would share one namespace and one host name (signup's ids, lower-case UUIDs, all are)."""
    if dns_label(customer_id) != customer_id:
        raise BackendError(
            f"customer id {customer_id[:80]!r} is not a DNS label (a-z, 0-9 and '-', at most "
            "63): its namespace and host name could be another customer's"
        )


def namespace_owner_conflict(namespace: dict[str, Any] | None, customer_id: str) -> str | None:
    """Why the existing ``namespace`` is not ``customer_id``'s (it records another customer:
    their ids map to one name, e.g. cut short by a long prefix), or None when it is theirs or
    records nobody (made before the record, or not yet made)."""
    meta = (namespace or {}).get("metadata") or {}
    owner = (meta.get("annotations") or {}).get(CUSTOMER_ANNOTATION)
    if owner is None or owner == customer_id:
        return None
    return (
        f"namespace {meta.get('name', '?')} belongs to customer {str(owner)[:80]!r}, "
        f"not {customer_id[:80]!r}: their ids map to one name"
    )


def secret_conflict(namespace: dict[str, Any] | None, fingerprint: str) -> str | None:
    """Why ``namespace``'s objects were applied with another PROVISIONER_SECRET than the one
    of ``fingerprint``, or None (the same, or not recorded)."""
    meta = (namespace or {}).get("metadata") or {}
    recorded = (meta.get("annotations") or {}).get(SECRET_FINGERPRINT)
    if recorded is None or recorded == fingerprint:
        return None
    return (
        f"namespace {meta.get('name', '?')} was applied with another PROVISIONER_SECRET than "
        "this one: applying would give the customer passwords their broker has never had "
        "(use the provisioner's own secret)"
    )


def pinned_by_digest(image: str) -> bool:
    """Whether ``image`` names its content by a sha256 digest (``repo[:tag]@sha256:<hex>``)."""
    return bool(_DIGEST.search(image))


def credentials_hash(*values: str) -> str:
    """A short digest of credentials, for a pod template's annotation: when they change (a
    rotation), the template changes and the workload rolls; the values cannot be read back."""
    return hashlib.sha256("\0".join(values).encode()).hexdigest()[:16]


def namespace_of(customer_id: str, settings: KubernetesSettings) -> str:
    """``customer-<id>``."""
    return dns_label(f"{settings.namespace_prefix}{dns_label(customer_id)}")


def host_of(customer_id: str, settings: KubernetesSettings) -> str:
    """``<id>.<base domain>``, where the customer's instance answers."""
    return f"{dns_label(customer_id)}.{settings.base_domain}"


def _meta(name: str, namespace: str | None, customer_id: str, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "labels": {
            "app.kubernetes.io/part-of": PART_OF,
            "app.kubernetes.io/managed-by": "iotistic-provisioner",
            "iotistic.io/customer-id": dns_label(customer_id),
            **extra.pop("labels", {}),
        },
        **extra,
    }
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


READER_BINDING = "iotistic-provisioner-reads"


def reader_binding(
    ns: str, customer_id: str, settings: KubernetesSettings
) -> dict[str, Any] | None:
    """The RoleBinding that lets the provisioner's worker read in the tenant's namespace ``ns``
    (its workloads, volumes, CronJob, Jobs and their pods: the reader ClusterRole of the chart,
    bound here only), or None without ``settings.tenant_reader``. The worker's own ClusterRole
    holds no read of those kinds, so nothing of another namespace is readable to it; the
    admission policy admits this RoleBinding, with exactly this role and subject, only in
    tenant namespaces."""
    if settings.tenant_reader is None:
        return None
    role, sa_namespace, sa_name = settings.tenant_reader
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(READER_BINDING, ns, customer_id),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": sa_name, "namespace": sa_namespace}],
    }


def render(
    spec: InstanceSpec,
    settings: KubernetesSettings,
    db_password: str,
    mqtt_admin_password: str = "",
    mqtt_password: str = "",
    login_relay_key: str = "",
    mqtt_client_id: str = "",
    monitoring_token: str = "",
    usage_token: str = "",
    postgres_password: str = "",
    mqtt_admin_password_previous: str = "",
    credentials_generation: int = 0,
    secret_fingerprint: str = "",
) -> list[dict[str, Any]]:
    """Every object of the customer's instance, in apply order.

    The broker keeps its clients (dynamic security) on a volume of its own; its admin, which
    the instance uses to give devices their credentials, and the instance's own ingest client
    have the passwords given here, and the ingest client is bound to ``mqtt_client_id``.
    ``monitoring_token`` opens the instance's metrics and readiness detail; ``usage_token`` is
    the instance's credential for its usage reports to billing.

    ``db_password`` is the instance's own database role's, ``postgres_password`` the
    superuser's, which only the Postgres pod sees. ``credentials_generation`` is recorded on
    the Namespace, where the backend reads it back before the next apply; after a rotation
    ``mqtt_admin_password_previous`` (the earlier ones, a line each, newest first) lets the
    broker move its admin to the new password."""
    cid = spec.customer_id
    check_customer_id(cid)
    ns = namespace_of(cid, settings)
    database = PG_DATABASE
    storage = tenant_storage(spec.plan, spec.license_jwt, settings.storage)
    db_url = f"postgresql://{PG_INSTANCE_ROLE}:{db_password}@postgres.{ns}.svc:5432/{database}"
    namespace_meta = _meta(
        ns,
        None,
        cid,
        labels=dict(NAMESPACE_LABELS),
        annotations={
            CREDENTIALS_GENERATION: str(credentials_generation),
            CUSTOMER_ANNOTATION: cid,
            **({SECRET_FINGERPRINT: secret_fingerprint} if secret_fingerprint else {}),
        },
    )
    hashes = {
        "postgres": credentials_hash(db_password, postgres_password),
        "mosquitto": credentials_hash(mqtt_admin_password),
        "instance": credentials_hash(
            db_password,
            mqtt_admin_password,
            mqtt_password,
            mqtt_client_id,
            monitoring_token,
            login_relay_key,
            usage_token,
        ),
    }
    reads = reader_binding(ns, cid, settings)
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": namespace_meta},
        # Right after the namespace: before anything the backend reads back.
        *([reads] if reads is not None else []),
        _quota(ns, cid, storage),
        _limits(ns, cid),
        _network_policy(ns, cid, settings),
        *_gateway_ingress(ns, cid, settings),
        _instance_egress(ns, cid, settings),
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta("license", ns, cid),
            "type": "Opaque",
            "stringData": {"license.jwt": spec.license_jwt, "license-id": spec.license_id},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta("database", ns, cid),
            "type": "Opaque",
            "stringData": {
                "user": PG_INSTANCE_ROLE,
                "password": db_password,
                "database": database,
                "url": db_url,
            },
        },
        {
            # The superuser's password: mounted by the Postgres pod only.
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta("postgres", ns, cid),
            "type": "Opaque",
            "stringData": {"superuser-password": postgres_password},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta("mqtt", ns, cid),
            "type": "Opaque",
            "stringData": {
                "admin-username": MQTT_ADMIN,
                "admin-password": mqtt_admin_password,
                "username": MQTT_INGEST,
                "password": mqtt_password,
                "client-id": mqtt_client_id,
                # Mounted by the broker only: the admin's earlier passwords, newest first.
                "admin-password-previous": mqtt_admin_password_previous,
            },
        },
        {
            # The key the dashboard signs browsers' addresses with when it relays a sign-in,
            # and the token the instance reports its usage to billing with.
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta("control-plane", ns, cid),
            "type": "Opaque",
            "stringData": {"login-relay-key": login_relay_key, "usage-token": usage_token},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta("monitoring", ns, cid),
            "type": "Opaque",
            "stringData": {"token": monitoring_token},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta("mosquitto", ns, cid),
            "data": {"mosquitto.conf": MOSQUITTO_CONF, "post-start.sh": MQTT_POST_START_SH},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta("postgres-scripts", ns, cid),
            "data": POSTGRES_SCRIPTS,
        },
        k8s_backups.config_map(_meta(k8s_backups.CONFIG_MAP, ns, cid)),
        # Before the StatefulSet, which then adopts the data claim at the plan's size.
        *_volume_claims(ns, cid, storage, settings),
        _postgres_service(ns, cid),
        _postgres(ns, cid, settings, hashes["postgres"]),
        k8s_backups.cronjob(
            _meta(k8s_backups.CRONJOB, ns, cid),
            cid,
            settings.postgres_image,
            storage.backups_kept,
            settings.backup_schedule,
        ),
        _mosquitto_service(ns, cid),
        _mosquitto(ns, cid, settings, hashes["mosquitto"]),
        _instance_service(ns, cid),
        _instance(spec, ns, settings, hashes["instance"]),
        *_http_route(spec, ns, settings),
    ]


def _volume_claims(
    ns: str, cid: str, storage: TenantStorage, settings: KubernetesSettings
) -> list[dict[str, Any]]:
    return volume_claims(
        _meta(DATA_CLAIM, ns, cid, labels={"app.kubernetes.io/name": "postgres"}),
        _meta(BACKUP_CLAIM, ns, cid, labels={"app.kubernetes.io/name": "tenant-backup"}),
        storage,
        settings.storage_class,
    )


def _quota(ns: str, cid: str, storage: TenantStorage) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": _meta("customer-quota", ns, cid),
        "spec": {
            "hard": {
                "requests.cpu": "4",
                "requests.memory": "4Gi",
                "limits.cpu": "4",
                "limits.memory": "4Gi",
                "persistentvolumeclaims": "4",
                # The data, backups and broker volumes (k8s_storage.keep_grown raises it
                # where a volume is bigger than its plan's size).
                "requests.storage": f"{storage.total_gib}Gi",
            }
        },
    }


def _limits(ns: str, cid: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "LimitRange",
        "metadata": _meta("container-defaults", ns, cid),
        "spec": {
            "limits": [
                {
                    "type": "Container",
                    "default": {"cpu": "500m", "memory": "512Mi"},
                    "defaultRequest": {"cpu": "100m", "memory": "128Mi"},
                    "max": {"cpu": "2", "memory": "2Gi"},
                }
            ]
        },
    }


def _namespace_peer(name: str, pod_labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A NetworkPolicy peer: the pods (with ``pod_labels``, or all) of the namespace ``name``."""
    peer: dict[str, Any] = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}
    }
    if pod_labels is not None:
        peer["podSelector"] = {"matchLabels": dict(pod_labels)}
    return peer


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def _network_policy(ns: str, cid: str, settings: KubernetesSettings) -> dict[str, Any]:
    """Every pod of the tenant: in from its own namespace only (the Gateway's way in is
    ``_gateway_ingress``, pod by pod), out to its own namespace and the cluster DNS only."""
    dns = _namespace_peer(settings.dns_namespace, settings.dns_pod_labels)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta("isolate-customer", ns, cid),
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {}}]}],
            "egress": [
                {"to": [{"podSelector": {}}]},
                {"to": [dns], "ports": [{"protocol": "UDP", "port": 53}, *_tcp(53)]},
            ],
        },
    }


def _gateway_ingress(ns: str, cid: str, settings: KubernetesSettings) -> list[dict[str, Any]]:
    """The Gateway's Envoy proxies in: to the instance's HTTP port, and (devices' MQTT over
    WebSockets, TLS ended at the Gateway) to the broker's WebSockets port; nothing else, and
    no other pod of the tenant."""
    proxies = _namespace_peer(settings.gateway_proxy_namespace, settings.gateway_proxy_pod_labels)
    return [
        {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(f"gateway-to-{target}", ns, cid),
            "spec": {
                "podSelector": {"matchLabels": {"app.kubernetes.io/name": target}},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [proxies], "ports": _tcp(port)}],
            },
        }
        for target, port in (("instance", INSTANCE_PORT), ("mosquitto", MQTT_WEBSOCKETS_PORT))
    ]


def _instance_egress(ns: str, cid: str, settings: KubernetesSettings) -> dict[str, Any]:
    """The instance pods, besides their namespace and DNS: the control plane's HTTP targets on
    their port only (never its NATS, Postgres or provisioner), and public addresses on the
    webhook ports (alert webhooks), plus the networks the operator allowed webhooks to reach.
    Postgres and Mosquitto get nothing beyond their namespace and DNS."""
    control_plane = _namespace_peer(settings.control_plane_namespace)
    control_plane["podSelector"] = {
        "matchLabels": dict(settings.control_plane_pod_labels),
        "matchExpressions": [
            {
                "key": "app.kubernetes.io/component",
                "operator": "In",
                "values": list(settings.control_plane_components),
            }
        ],
    }
    webhooks = public_internet(settings.cluster_cidrs) + _allowed_networks(settings)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta("instance-egress", ns, cid),
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "instance"}},
            "policyTypes": ["Egress"],
            "egress": [
                {"to": [control_plane], "ports": _tcp(settings.control_plane_port)},
                {"to": webhooks, "ports": _tcp(*settings.webhook_ports)},
            ],
        },
    }


def public_internet(cluster_cidrs: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """``ipBlock`` peers for every public address: all of IPv4 and IPv6 except the ranges that
    are not public and the cluster's own networks (as far as a NetworkPolicy can say it: pod
    addresses are matched by ipBlock only where the network plugin does so)."""
    blocks = []
    carriers = tuple(prefix for prefix, _ in IPV4_IN_IPV6)
    for everything, refused in (("0.0.0.0/0", NOT_PUBLIC_V4), ("::/0", NOT_PUBLIC_V6 + carriers)):
        excepted = [ipaddress.ip_network(c) for c in refused]
        blocks.append(_block(ipaddress.ip_network(everything), excepted, cluster_cidrs))
    not_public_v4 = [ipaddress.IPv4Network(c) for c in NOT_PUBLIC_V4] + [
        net for net in map(ipaddress.ip_network, cluster_cidrs) if net.version == 4
    ]
    for prefix, shift in IPV4_IN_IPV6:
        carrier = ipaddress.IPv6Network(prefix)
        carried: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
            ipaddress.IPv6Network(
                (
                    int(carrier.network_address) | (int(v4.network_address) << shift),
                    carrier.prefixlen + v4.prefixlen,
                )
            )
            for v4 in not_public_v4
        ]
        blocks.append(_block(carrier, _outermost(carried), ()))
    return blocks


def _outermost(
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """``networks`` less those inside another of them (an ipBlock's exceptions may not nest)."""
    return [
        net
        for net in networks
        if not any(
            other != net and net.subnet_of(other)  # type: ignore[arg-type]
            for other in networks
        )
    ]


def _allowed_networks(settings: KubernetesSettings) -> list[dict[str, Any]]:
    """``ipBlock`` peers for ALERT_WEBHOOK_ALLOWED_CIDRS, which the instance lets its webhooks
    reach although they are not public: the policy must agree, less the cluster's networks (a
    pod or Service address stays refused even inside an allowed private range)."""
    clusters = [ipaddress.ip_network(c, strict=False) for c in settings.cluster_cidrs]
    blocks = []
    for item in settings.alert_webhook_allowed_cidrs.split(","):
        if item.strip():
            allowed = ipaddress.ip_network(item.strip(), strict=False)
            same_version = [c for c in clusters if c.version == allowed.version]
            if not any(allowed.subnet_of(c) for c in same_version):  # type: ignore[arg-type]
                blocks.append(_block(allowed, [], settings.cluster_cidrs))
    return blocks


def _block(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
    excepted: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
    cluster_cidrs: tuple[str, ...],
) -> dict[str, Any]:
    """An ``ipBlock`` of ``network`` less ``excepted`` and the cluster networks inside it (an
    exception must lie inside the block; one already inside another exception is left out)."""
    for cidr in cluster_cidrs:
        cluster = ipaddress.ip_network(cidr, strict=False)
        if (
            cluster.version == network.version
            and cluster.subnet_of(network)  # type: ignore[arg-type]
            and cluster != network
            and not any(cluster.subnet_of(e) for e in excepted)  # type: ignore[arg-type]
        ):
            excepted.append(cluster)
    block: dict[str, Any] = {"cidr": str(network)}
    if excepted:
        block["except"] = [str(e) for e in excepted]
    return {"ipBlock": block}


def _service(
    name: str, ns: str, cid: str, ports: list[dict[str, Any]], headless: bool = False
) -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": {"app.kubernetes.io/name": name}, "ports": ports}
    if headless:
        spec["clusterIP"] = "None"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, ns, cid, labels={"app.kubernetes.io/name": name}),
        "spec": spec,
    }


def _postgres_service(ns: str, cid: str) -> dict[str, Any]:
    return _service(
        "postgres", ns, cid, [{"name": "postgres", "port": 5432, "targetPort": 5432}], True
    )


def _mosquitto_service(ns: str, cid: str) -> dict[str, Any]:
    return _service(
        "mosquitto",
        ns,
        cid,
        [
            {"name": "mqtt", "port": 1883, "targetPort": 1883},
            {"name": "websockets", "port": 9001, "targetPort": 9001},
        ],
    )


def _instance_service(ns: str, cid: str) -> dict[str, Any]:
    return _service("instance", ns, cid, [{"name": "http", "port": 80, "targetPort": "http"}])


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


# Tenants' Postgres and Mosquitto run as users above 10000, clear of any host's own users.
POSTGRES_UID = 10999
MOSQUITTO_UID = 11883


def _pod_security(uid: int) -> dict[str, Any]:
    """The pod's security context: a non-root user and group of its own, the volumes' group,
    the runtime's seccomp profile for every container."""
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _restricted() -> dict[str, Any]:
    # A copy each time: one dict shared by two containers would be written as a YAML alias.
    return copy.deepcopy(RESTRICTED)


# No pod of a tenant talks to the Kubernetes API, and none needs the services' env variables
# (which would also put e.g. INSTANCE_PORT=tcp://... into the instance's environment).
NO_CLUSTER_ACCESS = {"automountServiceAccountToken": False, "enableServiceLinks": False}
# Readable by the pod's group (its fsGroup) only.
SECRET_FILE_MODE = 0o440


def _postgres(ns: str, cid: str, settings: KubernetesSettings, credentials: str) -> dict[str, Any]:
    claim = _claim("10Gi", settings)
    labels = {"app.kubernetes.io/name": "postgres"}
    scripts_hash = hashlib.sha256(
        "\0".join(f"{k}={v}" for k, v in sorted(POSTGRES_SCRIPTS.items())).encode()
    ).hexdigest()[:16]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta("postgres", ns, cid, labels=dict(labels)),
        "spec": {
            "serviceName": "postgres",
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": labels,
                    # New scripts or rotated passwords restart Postgres, whose start keeps the
                    # instance role in step with the Secret.
                    "annotations": {
                        "iotistic.io/config-sha256": scripts_hash,
                        CREDENTIALS_HASH: credentials,
                    },
                },
                "spec": {
                    **NO_CLUSTER_ACCESS,
                    "securityContext": {
                        # A user of its own, not the image's (999: a host's system range); the
                        # official image runs as any user (its nss_wrapper), owning what it
                        # makes in the volume (fsGroup gives it the volume's root).
                        **_pod_security(POSTGRES_UID),
                        "fsGroupChangePolicy": "OnRootMismatch",
                    },
                    "containers": [
                        {
                            "name": "postgres",
                            "image": settings.postgres_image,
                            "imagePullPolicy": "IfNotPresent",
                            "ports": [{"name": "postgres", "containerPort": 5432}],
                            "env": [
                                # Not secrets: the names. The passwords are files.
                                {"name": "POSTGRES_USER", "value": PG_SUPERUSER},
                                {"name": "POSTGRES_DB", "value": PG_DATABASE},
                                {
                                    "name": "POSTGRES_PASSWORD_FILE",
                                    "value": f"{PG_SECRETS_DIR}/superuser-password",
                                },
                                {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"},
                            ],
                            "lifecycle": {
                                "postStart": {
                                    "exec": {"command": ["sh", f"{PG_SCRIPTS_DIR}/post-start.sh"]}
                                }
                            },
                            # Over TCP: the first start's temporary server listens on its
                            # socket only, and the instance comes over TCP.
                            "readinessProbe": {
                                "exec": {"command": ["pg_isready", "-q", "-h", "127.0.0.1"]},
                                "periodSeconds": 5,
                            },
                            # Alive while it answers at all: a long crash recovery (or the
                            # first initdb) is no reason to kill it.
                            "startupProbe": {
                                "exec": {"command": PG_ANSWERS},
                                "periodSeconds": 5,
                                "failureThreshold": 120,
                            },
                            "livenessProbe": {
                                "exec": {"command": PG_ANSWERS},
                                "periodSeconds": 10,
                                "timeoutSeconds": 5,
                                "failureThreshold": 6,
                            },
                            "resources": {
                                "requests": {"cpu": "250m", "memory": "512Mi"},
                                "limits": {"cpu": "1", "memory": "1Gi"},
                            },
                            "securityContext": _restricted(),
                            "volumeMounts": [
                                {"name": "data", "mountPath": "/var/lib/postgresql/data"},
                                # The root filesystem is read-only: its socket and lock
                                # file, and bash's and nss_wrapper's temporary files.
                                {"name": "run", "mountPath": "/var/run/postgresql"},
                                {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108
                                {
                                    "name": "secrets",
                                    "mountPath": PG_SECRETS_DIR,
                                    "readOnly": True,
                                },
                                {"name": "scripts", "mountPath": PG_SCRIPTS_DIR, "readOnly": True},
                                {
                                    "name": "initdb",
                                    "mountPath": "/docker-entrypoint-initdb.d",
                                    "readOnly": True,
                                },
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "run", "emptyDir": {"sizeLimit": "16Mi"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                        {
                            "name": "secrets",
                            "projected": {
                                "defaultMode": SECRET_FILE_MODE,
                                "sources": [
                                    {
                                        "secret": {
                                            "name": "database",
                                            "items": [
                                                {"key": "user", "path": "user"},
                                                {"key": "password", "path": "password"},
                                            ],
                                        }
                                    },
                                    {
                                        "secret": {
                                            "name": "postgres",
                                            "items": [
                                                {
                                                    "key": "superuser-password",
                                                    "path": "superuser-password",
                                                }
                                            ],
                                        }
                                    },
                                ],
                            },
                        },
                        {
                            "name": "scripts",
                            "configMap": {"name": "postgres-scripts", "defaultMode": 0o444},
                        },
                        {
                            "name": "initdb",
                            "configMap": {
                                "name": "postgres-scripts",
                                "defaultMode": 0o444,
                                "items": [
                                    {"key": "10-instance-role.sh", "path": "10-instance-role.sh"}
                                ],
                            },
                        },
                    ],
                },
            },
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": claim}],
        },
    }


def _mosquitto(ns: str, cid: str, settings: KubernetesSettings, credentials: str) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "mosquitto"}
    # A new configuration (new limits) changes the pod template, so the broker rolls; so do
    # rotated credentials, whose postStart moves the admin to the new password.
    config_hash = hashlib.sha256((MOSQUITTO_CONF + MQTT_POST_START_SH).encode()).hexdigest()[:16]
    admin_mount = {"name": "admin", "mountPath": MQTT_ADMIN_DIR, "readOnly": True}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta("mosquitto", ns, cid, labels=dict(labels)),
        "spec": {
            "serviceName": "mosquitto",
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "iotistic.io/config-sha256": config_hash,
                        CREDENTIALS_HASH: credentials,
                    },
                },
                "spec": {
                    **NO_CLUSTER_ACCESS,
                    # A user of its own, not the image's 1883 (a host's system range): the
                    # broker writes only its data volume, which fsGroup gives it.
                    "securityContext": _pod_security(MOSQUITTO_UID),
                    "initContainers": [
                        {
                            # The first start makes the dynamic-security file with the admin.
                            "name": "dynsec-init",
                            "image": settings.mosquitto_image,
                            "imagePullPolicy": "IfNotPresent",
                            "command": [
                                "sh",
                                "-c",
                                f"[ -f {DYNSEC_FILE} ] || mosquitto_ctrl dynsec init {DYNSEC_FILE} "
                                f'"$(cat {MQTT_ADMIN_DIR}/admin-username)" '
                                f'"$(cat {MQTT_ADMIN_DIR}/admin-password)"',
                            ],
                            "resources": {
                                "requests": {"cpu": "50m", "memory": "32Mi"},
                                "limits": {"cpu": "200m", "memory": "64Mi"},
                            },
                            "securityContext": _restricted(),
                            "volumeMounts": [
                                {"name": "data", "mountPath": "/mosquitto/data"},
                                admin_mount,
                            ],
                        }
                    ],
                    "containers": [
                        {
                            "name": "mosquitto",
                            "image": settings.mosquitto_image,
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["mosquitto", "-c", "/mosquitto/config/mosquitto.conf"],
                            "ports": [
                                {"name": "mqtt", "containerPort": 1883},
                                {"name": "websockets", "containerPort": 9001},
                            ],
                            "lifecycle": {
                                "postStart": {
                                    "exec": {"command": ["sh", "/mosquitto/config/post-start.sh"]}
                                }
                            },
                            "readinessProbe": {"tcpSocket": {"port": 1883}, "periodSeconds": 5},
                            # The listener accepts: cheap, and needs no credential (an admin
                            # password out of step must not restart the broker under devices).
                            "livenessProbe": {
                                "tcpSocket": {"port": 1883},
                                "periodSeconds": 20,
                                "failureThreshold": 3,
                            },
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "64Mi"},
                                "limits": {"cpu": "500m", "memory": "256Mi"},
                            },
                            "securityContext": _restricted(),
                            "volumeMounts": [
                                {"name": "config", "mountPath": "/mosquitto/config"},
                                {"name": "data", "mountPath": "/mosquitto/data"},
                                admin_mount,
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "config", "configMap": {"name": "mosquitto"}},
                        {
                            "name": "admin",
                            "secret": {
                                "secretName": "mqtt",
                                "defaultMode": SECRET_FILE_MODE,
                                "items": [
                                    {"key": k, "path": k}
                                    for k in (
                                        "admin-username",
                                        "admin-password",
                                        "admin-password-previous",
                                    )
                                ],
                            },
                        },
                    ],
                },
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "data"},
                    "spec": _claim("1Gi", settings),
                }
            ],
        },
    }


def _claim(size: str, settings: KubernetesSettings) -> dict[str, Any]:
    claim: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": size}},
    }
    if settings.storage_class:
        claim["storageClassName"] = settings.storage_class
    return claim


def _instance(
    spec: InstanceSpec, ns: str, settings: KubernetesSettings, credentials: str = ""
) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": "instance"}
    probe = {"httpGet": {"path": "/health/ready", "port": "http"}, "periodSeconds": 5}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta("instance", ns, spec.customer_id, labels=dict(labels)),
        "spec": {
            "replicas": 1,
            # One pod at a time: two would share the ingest client's MQTT client id, and the
            # broker would throw each out for the other. A rollout has a short gap instead.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": labels,
                    # A new license changes the template, so the Deployment rolls; so does a
                    # redeploy that must replace the running pods (kubectl's rollout restart),
                    # and rotated credentials.
                    "annotations": {
                        "iotistic.io/license-id": spec.license_id,
                        **({"iotistic.io/restart": spec.restart_key} if spec.restart_key else {}),
                        CREDENTIALS_HASH: credentials,
                    },
                },
                "spec": {
                    **NO_CLUSTER_ACCESS,
                    "securityContext": _pod_security(10001),
                    "containers": [
                        {
                            "name": "instance",
                            "image": settings.instance_image,
                            "imagePullPolicy": "IfNotPresent",
                            "args": ["run", "--target", "instance"],
                            "ports": [{"name": "http", "containerPort": INSTANCE_PORT}],
                            "env": [
                                {"name": "INSTANCE_CUSTOMER_ID", "value": spec.customer_id},
                                _secret_env("DATABASE_URL", "database", "url"),
                                {
                                    "name": "LICENSE_FILE",
                                    "value": "/etc/iotistic/license/license.jwt",
                                },
                                {"name": "LICENSE_JWKS_URL", "value": spec.jwks_url},
                                {"name": "HTTP_HOST", "value": "0.0.0.0"},  # noqa: S104
                                {"name": "HTTP_PORT", "value": str(INSTANCE_PORT)},
                                {"name": "MQTT_HOST", "value": "mosquitto"},
                                {"name": "MQTT_PORT", "value": "1883"},
                                {
                                    "name": "MQTT_PUBLIC_URLS",
                                    "value": mqtt_public_url(spec.customer_id, settings),
                                },
                                _secret_env("MQTT_USERNAME", "mqtt", "username"),
                                _secret_env("MQTT_PASSWORD", "mqtt", "password"),
                                # Optional: a Secret of an older version lacks them (the
                                # id then derives from the password; /metrics needs a session).
                                _secret_env("MQTT_CLIENT_ID", "mqtt", "client-id", optional=True),
                                _secret_env(
                                    "MONITORING_TOKEN", "monitoring", "token", optional=True
                                ),
                                {
                                    "name": "ALERT_WEBHOOK_ALLOWED_CIDRS",
                                    "value": settings.alert_webhook_allowed_cidrs,
                                },
                                _secret_env("MQTT_ADMIN_USERNAME", "mqtt", "admin-username"),
                                _secret_env("MQTT_ADMIN_PASSWORD", "mqtt", "admin-password"),
                                _secret_env("LOGIN_RELAY_KEY", "control-plane", "login-relay-key"),
                                # Each owner directly, through its own Service: signup checks
                                # sign-ins and sessions, billing takes the usage reports.
                                # (LOG_LEVEL stays the instance's INFO: the kubelet rotates a
                                # container's log, unlike the local backend's log files.)
                                {"name": "CONTROL_PLANE_URL", "value": settings.control_plane_url},
                                {
                                    "name": "USAGE_URL",
                                    "value": settings.usage_url or settings.control_plane_url,
                                },
                                _secret_env("USAGE_TOKEN", "control-plane", "usage-token"),
                                {
                                    "name": "USAGE_REPORT_SECONDS",
                                    "value": str(settings.usage_report_seconds),
                                },
                                # Browsers come through the ingress controller, which sets
                                # X-Forwarded-For to the address it saw.
                                {"name": "TRUSTED_PROXY_HOPS", "value": "1"},
                            ],
                            "readinessProbe": probe,
                            "livenessProbe": {
                                "httpGet": {"path": "/health/live", "port": "http"},
                                "periodSeconds": 10,
                            },
                            "resources": {
                                "requests": {"cpu": "250m", "memory": "256Mi"},
                                "limits": {"cpu": "1", "memory": "1Gi"},
                            },
                            "securityContext": _restricted(),
                            "volumeMounts": [
                                {
                                    "name": "license",
                                    "mountPath": "/etc/iotistic/license",
                                    "readOnly": True,
                                },
                                {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "license", "secret": {"secretName": "license"}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def mqtt_public_url(customer_id: str, settings: KubernetesSettings) -> str:
    """Where the customer's devices connect: MQTT over WebSockets through the shared Gateway."""
    return f"wss://{host_of(customer_id, settings)}{MQTT_PATH}"


def _http_route(spec: InstanceSpec, ns: str, settings: KubernetesSettings) -> list[dict[str, Any]]:
    """The tenant's HTTPRoute on the shared Gateway, after the traffic policy that limits it
    (applied first, so the route never serves unlimited)."""
    route = _route(ns, spec.customer_id, settings)
    if not settings.gateway_traffic_policy:
        return [route]
    return [_traffic_policy(spec, ns, settings), route]


def _route(ns: str, cid: str, settings: KubernetesSettings) -> dict[str, Any]:
    """``<id>.<base domain>``: ``/mqtt`` to the broker's WebSockets, the rest to the instance.
    TLS ends at the Gateway's wildcard listener, so nothing here asks for a certificate. Envoy
    ends a route's request after 15 s unless told otherwise, whole response included: a
    device's MQTT session and a page's live stream would be cut, so their rules have no request
    timeout ("0s" disables it, in Gateway API), and a CSV export has a long one; a WebSocket
    upgrade needs nothing else, Envoy Gateway allows it on every route. Envoy Gateway ranks an
    Exact path, then a RegularExpression, then the longest PathPrefix."""

    def rule(name: str, path: str, match: str, service: str, port: int, timeout: str) -> Any:
        return {
            "name": name,
            "matches": [{"path": {"type": match, "value": path}}],
            "backendRefs": [{"kind": "Service", "name": service, "port": port}],
            "timeouts": {"request": timeout},
        }

    return {
        "apiVersion": f"{GATEWAY_API}/v1",
        "kind": "HTTPRoute",
        "metadata": _meta("instance", ns, cid),
        "spec": {
            "parentRefs": [
                {
                    "group": GATEWAY_API,
                    "kind": "Gateway",
                    "name": settings.gateway_name,
                    "namespace": settings.control_plane_namespace,
                    "sectionName": GATEWAY_LISTENER,
                }
            ],
            "hostnames": [host_of(cid, settings)],
            "rules": [
                rule("mqtt", MQTT_PATH, "Exact", "mosquitto", MQTT_WEBSOCKETS_PORT, "0s"),
                rule("live", LIVE_STREAM_PATH, "Exact", "instance", 80, "0s"),
                rule(
                    "export",
                    EXPORT_PATH,
                    "RegularExpression",
                    "instance",
                    80,
                    settings.gateway_export_timeout,
                ),
                rule("app", "/", "PathPrefix", "instance", 80, settings.gateway_request_timeout),
            ],
        },
    }


def _traffic_policy(spec: InstanceSpec, ns: str, settings: KubernetesSettings) -> dict[str, Any]:
    """Envoy Gateway's limits on this tenant's route, so one tenant's flood or one client's
    cannot take the shared proxies from the others: a request rate per client address (a
    bucket per address, IPv4 and IPv6), and circuit breakers sized by the license: Envoy's
    default of 1024 connections and requests in flight to a backend would refuse devices of a
    large plan (each holds one for its session), and nothing larger than the broker's own
    limit is useful. Both count per Envoy replica; the Gateway must see the client's address
    (its Service's externalTrafficPolicy Local, or PROXY protocol), or every client shares one
    bucket. A per-tenant total rate cannot be added: with per-address rules Envoy Gateway's
    local rate limit never consumes its default bucket."""
    connections = min(spec.max_devices + settings.gateway_connections_headroom, MAX_CONNECTIONS)
    policy: dict[str, Any] = {
        "targetRefs": [{"group": GATEWAY_API, "kind": "HTTPRoute", "name": "instance"}],
        "circuitBreaker": {
            "maxConnections": connections,
            "maxParallelRequests": connections,
        },
    }
    if settings.gateway_requests_per_client:
        policy["rateLimit"] = {
            # ``type`` is deprecated since Envoy Gateway 1.6 and required before it.
            "type": "Local",
            "local": {
                "rules": [
                    {
                        "clientSelectors": [{"sourceCIDR": {"type": "Distinct", "value": cidr}}],
                        "limit": {
                            "requests": settings.gateway_requests_per_client,
                            "unit": "Second",
                        },
                    }
                    for cidr in ("0.0.0.0/0", "::/0")
                ]
            },
        }
    return {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "BackendTrafficPolicy",
        "metadata": _meta("instance", ns, spec.customer_id),
        "spec": policy,
    }


class _NoAliases(yaml.SafeDumper):
    # Every object written out in full: no "&id001"/"*id001" for a dict used twice.
    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_yaml(objects: list[dict[str, Any]]) -> str:
    """The objects as one multi-document YAML stream."""
    return str(yaml.dump_all(objects, Dumper=_NoAliases, sort_keys=False, default_flow_style=False))
