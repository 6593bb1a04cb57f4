"""Alerts: rules on a metric (or on silence), evaluated every few seconds per device.

A rule ``{metric, operator, threshold, for_seconds, devices}`` fires for a device when the
device's newest reading has met the condition continuously for ``for_seconds`` (pending
until then), and resolves when a newer reading no longer meets it. The metric ``no_data``
fires when a device has sent nothing for ``for_seconds``. Each firing and resolution goes into
the history and, with the ``webhooks`` feature and a URL on the rule, into a delivery queue:
a POST signed with HMAC-SHA256 (``X-Iotistic-Signature: sha256=<hex>`` over
``<timestamp>.<body>``, the timestamp in ``X-Iotistic-Timestamp``), retried with backoff.

A webhook goes only to public addresses (``WebhookTargets``): its host name is resolved and
every address it resolves to is checked when the rule is made and again at each delivery, and
the POST goes to one of the addresses just checked (the name is kept for the Host header and
TLS), so a name that resolves elsewhere by the time of delivery cannot lead it into the
instance's own network. Operators may allow networks (``ALERT_WEBHOOK_ALLOWED_CIDRS``).

Nothing one rule or one delivery does stops the others: a rule that cannot be evaluated (one
stored by an older version, say) is rolled back alone, a delivery that fails in a way nobody
foresaw is recorded as a failed attempt, and either is logged and counted
(``iotistic_instance_alert_errors_total``); the loop itself goes on whatever a pass raised,
and says when it last finished one, which readiness checks.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
from prometheus_client import CollectorRegistry, Counter

from libs.config import ConfigError
from libs.db.postgres import CONNECTION_ERRORS, Turns
from services.instance.readings import METRICS

log = logging.getLogger(__name__)

OPERATORS = {
    ">": lambda v, t: v > t,
    ">=": lambda v, t: v >= t,
    "<": lambda v, t: v < t,
    "<=": lambda v, t: v <= t,
}
NO_DATA = "no_data"
MAX_DELIVERY_ATTEMPTS = 8
FRESH = timedelta(minutes=10)
# No progress (a pass, a delivery) for this long (at least) means the loop is stuck or dead.
STALLED_AFTER = 60.0
# One delivery, all its addresses included: a receiver that trickles its answer cannot hold
# the loop for longer.
DELIVERY_SECONDS = 30.0
MAX_URL_LENGTH = 2048
RESOLVE_SECONDS = 5.0
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# NAT64's well-known prefix carries an IPv4 address in its last 32 bits.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class RuleError(ValueError):
    """A rule that cannot be evaluated; names the field and why."""

    def __init__(self, field: str, reason: str) -> None:
        """``field`` of the request body, ``reason`` for people."""
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


class WebhookRefused(Exception):
    """A webhook URL that leads somewhere webhooks may not go; the message says why."""


@dataclass(frozen=True)
class WebhookTarget:
    """A webhook URL whose host resolved to ``addresses``, every one of them allowed."""

    url: httpx.URL
    host: str
    addresses: tuple[str, ...]

    def via(self, address: str) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
        """The URL to connect to ``address`` (one of ``addresses``), with the Host header and
        the TLS server name of the URL as given."""
        default = 443 if self.url.scheme == "https" else 80
        port = self.url.port
        name = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        host_header = name if port in (None, default) else f"{name}:{port}"
        extensions = {"sni_hostname": self.host} if self.url.scheme == "https" else {}
        return self.url.copy_with(host=address), {"Host": host_header}, extensions


def _embedded_ipv4(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64), else itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address in NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


@dataclass(frozen=True)
class WebhookTargets:
    """Where alert webhooks may go: public unicast addresses, and the networks an operator
    allows although they are not (``ALERT_WEBHOOK_ALLOWED_CIDRS``)."""

    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_setting(cls, text: str) -> WebhookTargets:
        """From comma-separated CIDRs; a ``ConfigError`` names one that is not."""
        networks = []
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ConfigError(
                    f"ALERT_WEBHOOK_ALLOWED_CIDRS: {item[:64]!r} is not a network in CIDR notation"
                ) from None
        return cls(tuple(networks))

    def refusal(self, address: IPAddress) -> str | None:
        """Why webhooks may not go to ``address`` (``loopback``, ``private``, ...), or None."""
        inner = _embedded_ipv4(address)
        if any(a in net for net in self.allowed for a in (address, inner)):
            return None
        for reason, refused in (
            ("unspecified", inner.is_unspecified),
            ("loopback", inner.is_loopback),
            ("link-local", inner.is_link_local),
            ("multicast", inner.is_multicast),
            ("reserved", inner.is_reserved),
            ("private", inner.is_private),
            ("non-public", not inner.is_global),
        ):
            if refused:
                return reason
        return None

    async def resolve(self, url: str) -> WebhookTarget:
        """Resolve the URL's host and check every address; ``WebhookRefused`` says why not."""
        try:
            parsed = httpx.URL(url)
            host = parsed.raw_host.decode("ascii")
        except (httpx.InvalidURL, UnicodeError):
            raise WebhookRefused("is not a valid URL") from None
        if parsed.scheme not in ("http", "https") or not host:
            raise WebhookRefused("must be an http(s) URL with a host")
        default = 443 if parsed.scheme == "https" else 80
        port = parsed.port if parsed.port is not None else default  # 0 is a port, not none
        if not 0 < port < 65536:
            raise WebhookRefused("has a port that is not from 1 to 65535")
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            addresses = await _resolved(host, port)
        for address in addresses:
            reason = self.refusal(address)
            if reason is not None:
                where = "is" if literal is not None else f"{host[:100]} resolves to"
                article = "an" if reason[0] in "aeiou" else "a"
                raise WebhookRefused(
                    f"{where} {article} {reason} address; webhooks go only to public addresses"
                )
        return WebhookTarget(parsed, host, tuple(dict.fromkeys(str(a) for a in addresses)))


async def _resolved(host: str, port: int) -> list[IPAddress]:
    try:
        async with asyncio.timeout(RESOLVE_SECONDS):
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
    except (OSError, TimeoutError, UnicodeError):
        raise WebhookRefused(f"{host[:100]} does not resolve") from None
    addresses = []
    for _family, _type, _proto, _name, sockaddr in infos:
        try:
            addresses.append(ipaddress.ip_address(str(sockaddr[0])))
        except ValueError:
            continue
    if not addresses:
        raise WebhookRefused(f"{host[:100]} does not resolve")
    return addresses


async def parse_rule(
    data: Any, webhooks_allowed: bool, targets: WebhookTargets | None = None
) -> dict[str, Any]:
    """A rule from a request body, or ``RuleError`` for the first bad field. A webhook URL
    must lead to an address ``targets`` allows (by default: public ones only)."""
    if not isinstance(data, dict):
        raise RuleError("body", "must be a JSON object")
    known = {"name", "metric", "operator", "threshold", "for_seconds", "devices", "webhook_url"}
    for key in data:
        if key not in known:
            raise RuleError(str(key)[:64], "is not a known field")
    metric = data.get("metric")
    if metric not in (*METRICS, NO_DATA):
        raise RuleError("metric", f"must be one of {', '.join((*METRICS, NO_DATA))}")
    operator, threshold = data.get("operator"), data.get("threshold")
    if metric != NO_DATA:
        if operator not in OPERATORS:
            raise RuleError("operator", f"must be one of {' '.join(OPERATORS)}")
        if not isinstance(threshold, int | float) or isinstance(threshold, bool):
            raise RuleError("threshold", "must be a number")
    for_seconds = data.get("for_seconds", 0)
    if (
        not isinstance(for_seconds, int)
        or isinstance(for_seconds, bool)
        or not 0 <= for_seconds <= 86400
    ):
        raise RuleError("for_seconds", "must be whole seconds from 0 to 86400")
    devices = data.get("devices", [])
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        raise RuleError("devices", "must be a list of device ids (empty: every device)")
    url = data.get("webhook_url")
    if url is not None:
        if not webhooks_allowed:
            raise RuleError("webhook_url", "the license does not include webhooks")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise RuleError("webhook_url", "must be an http(s) URL")
        if len(url) > MAX_URL_LENGTH:
            raise RuleError("webhook_url", f"must be at most {MAX_URL_LENGTH} characters")
        try:
            await (targets or WebhookTargets()).resolve(url)
        except WebhookRefused as exc:
            raise RuleError("webhook_url", str(exc)) from None
    name = data.get("name") or f"{metric} {operator or ''} {threshold or ''}".strip()
    return {
        "name": str(name)[:100],
        "metric": metric,
        "operator": operator if metric != NO_DATA else None,
        "threshold": float(threshold) if isinstance(threshold, int | float) else None,
        "for_seconds": for_seconds,
        "devices": devices,
        "webhook_url": url,
    }


async def create_rule(conn: asyncpg.Connection, rule: dict[str, Any]) -> dict[str, Any]:
    """Store the rule; a webhook secret is made for it and shown once."""
    rule_id = uuid.uuid4().hex[:16]
    secret = secrets.token_urlsafe(32) if rule["webhook_url"] else None
    await conn.execute(
        "INSERT INTO alert_rules (rule_id, name, metric, operator, threshold, for_seconds, "
        "devices, webhook_url, webhook_secret, created_at) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        rule_id,
        rule["name"],
        rule["metric"],
        rule["operator"],
        rule["threshold"],
        rule["for_seconds"],
        rule["devices"],
        rule["webhook_url"],
        secret,
        datetime.now(UTC),
    )
    return {"rule_id": rule_id, **rule, "webhook_secret": secret}


def sign(secret: str, timestamp: str, body: str) -> str:
    """``sha256=<hex>`` of HMAC-SHA256(secret, "<timestamp>.<body>")."""
    mac = hmac.new(secret.encode(), f"{timestamp}.{body}".encode(), hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


class AlertEngine:
    """Evaluates the rules and delivers the webhooks."""

    def __init__(
        self,
        pool: Callable[[], asyncpg.Pool | Turns],
        customer_id: str,
        alerting: Callable[[], bool],
        every: float = 2.0,
        targets: WebhookTargets | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """``alerting`` says whether the license includes alerting right now; webhooks go only
        where ``targets`` allows (by default: public addresses). The error counter goes into
        ``registry`` (the instance's /metrics)."""
        self._pool = pool
        self._customer = customer_id
        self._alerting = alerting
        self._every = every
        self._targets = targets or WebhookTargets()
        self.errors = Counter(
            "iotistic_instance_alert_errors_total",
            "Unexpected errors in alerting, by stage (a rule's evaluation, a delivery, a pass); "
            "the rest went on",
            ["stage"],
            registry=registry if registry is not None else CollectorRegistry(),
        )
        self._progress = time.monotonic()
        self._failing: set[str] = set()  # rules whose failure was logged with its traceback

    def stalled(self) -> bool:
        """True when the loop has made no progress (finished no pass, tried no delivery) for
        a while: it is stuck, dead, or every pass fails (the database is away)."""
        return time.monotonic() - self._progress > max(STALLED_AFTER, 10 * self._every)

    async def run(self) -> None:
        """Evaluate and deliver for ever; an error ends a pass, never the loop."""
        while True:
            await asyncio.sleep(self._every)
            try:
                if self._alerting():
                    await self.evaluate(datetime.now(UTC))
                await self.deliver(datetime.now(UTC))
                self._progress = time.monotonic()
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("alerts: %s", type(exc).__name__)
            except Exception:
                # A bug nobody foresaw: logged and counted, and the next pass tries again.
                log.exception("alerts: the pass failed; the next one runs as usual")
                self.errors.labels("pass").inc()

    async def evaluate(self, now: datetime) -> int:
        """One pass over every rule and device; returns how many alerts changed state. A
        rule that cannot be evaluated is rolled back alone, logged and counted."""
        changed = 0
        async with self._pool().acquire() as conn, conn.transaction():
            rules = await conn.fetch("SELECT * FROM alert_rules WHERE deleted_at IS NULL")
            devices = await conn.fetch(
                "SELECT device_id, last_seen FROM devices WHERE deleted_at IS NULL"
            )
            for rule in rules:
                scope = [
                    d for d in devices if not rule["devices"] or d["device_id"] in rule["devices"]
                ]
                try:
                    async with conn.transaction():  # a savepoint: this rule's changes only
                        for device in scope:
                            changed += await self._evaluate_one(conn, rule, device, now)
                except CONNECTION_ERRORS:
                    raise
                except Exception as exc:  # noqa: BLE001 - logged and counted in _rule_failed
                    self._rule_failed(rule["rule_id"], exc)
                else:
                    self._failing.discard(rule["rule_id"])
        return changed

    def _rule_failed(self, rule_id: str, exc: Exception) -> None:
        """Count every failure; log the traceback once per rule, not at every pass."""
        self.errors.labels("evaluate").inc()
        if rule_id in self._failing:
            return
        self._failing.add(rule_id)
        log.error(
            "alerts: rule %s cannot be evaluated (%s); the other rules go on",
            rule_id,
            type(exc).__name__,
            exc_info=exc,
        )

    async def _evaluate_one(
        self, conn: asyncpg.Connection, rule: asyncpg.Record, device: asyncpg.Record, now: datetime
    ) -> int:
        device_id = device["device_id"]
        if rule["metric"] == NO_DATA:
            seen = device["last_seen"]
            value = (now - seen).total_seconds() if seen else None
            # Silence counts from the last message (or from the rule's creation).
            since = seen or rule["created_at"]
            holds, since_true = (now - since).total_seconds() >= rule["for_seconds"], since
            return await self._transition(
                conn, rule, device_id, holds, since_true, now, value, True
            )
        newest = await conn.fetchrow(
            f"SELECT ts, {rule['metric']} AS v FROM readings WHERE device_id = $1 "
            f"AND ts > $2 ORDER BY ts DESC LIMIT 1",
            device_id,
            now - FRESH,
        )
        if newest is None or newest["v"] is None:
            return 0
        holds = OPERATORS[rule["operator"]](newest["v"], rule["threshold"])
        return await self._transition(
            conn, rule, device_id, holds, newest["ts"], now, newest["v"], False
        )

    async def _transition(
        self,
        conn: asyncpg.Connection,
        rule: asyncpg.Record,
        device_id: str,
        holds: bool,
        since_true: datetime,
        now: datetime,
        value: float | None,
        silence: bool,
    ) -> int:
        state = await conn.fetchrow(
            "SELECT * FROM alert_states WHERE rule_id = $1 AND device_id = $2",
            rule["rule_id"],
            device_id,
        )
        current = state["state"] if state else "ok"
        if holds and current == "ok":
            await self._set(conn, rule, device_id, "pending", since_true, value)
            current, state_since = "pending", since_true
        else:
            state_since = state["since"] if state else now
        if holds and current == "pending":
            if silence or (now - state_since).total_seconds() >= rule["for_seconds"]:
                await self._set(conn, rule, device_id, "firing", state_since, value)
                await self._record(conn, rule, device_id, "firing", now, value)
                return 1
            return 0
        if not holds and current in ("pending", "firing"):
            await self._set(conn, rule, device_id, "ok", now, value)
            if current == "firing":
                await self._record(conn, rule, device_id, "resolved", now, value)
                return 1
        return 0

    async def _set(
        self,
        conn: asyncpg.Connection,
        rule: asyncpg.Record,
        device_id: str,
        state: str,
        since: datetime,
        value: float | None,
    ) -> None:
        await conn.execute(
            "INSERT INTO alert_states (rule_id, device_id, state, since, value) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (rule_id, device_id) DO UPDATE SET "
            "state = $3, since = $4, value = $5",
            rule["rule_id"],
            device_id,
            state,
            since,
            value,
        )

    async def _record(
        self,
        conn: asyncpg.Connection,
        rule: asyncpg.Record,
        device_id: str,
        event: str,
        now: datetime,
        value: float | None,
    ) -> None:
        what = (
            "no data"
            if rule["metric"] == NO_DATA
            else (f"{rule['metric']} {rule['operator']} {rule['threshold']:g}")
        )
        message = f"{rule['name']}: {what} on device {device_id} {event}"
        await conn.execute(
            "INSERT INTO alert_history (rule_id, device_id, event, at, value, message) "
            "VALUES ($1, $2, $3, $4, $5, $6)",
            rule["rule_id"],
            device_id,
            event,
            now,
            value,
            message,
        )
        if rule["webhook_url"]:
            body = json.dumps(
                {
                    "customer_id": self._customer,
                    "rule_id": rule["rule_id"],
                    "rule": rule["name"],
                    "device_id": device_id,
                    "event": event,
                    "metric": rule["metric"],
                    "value": value,
                    "at": now.isoformat(),
                    "message": message,
                }
            )
            await conn.execute(
                "INSERT INTO webhook_deliveries (rule_id, url, body, next_at) "
                "VALUES ($1, $2, $3, $4)",
                rule["rule_id"],
                rule["webhook_url"],
                body,
                now,
            )

    async def deliver(self, now: datetime) -> int:
        """POST the webhooks that are due; failures back off (1 s, 2 s, 4 s ... 8 tries)."""
        async with self._pool().acquire() as conn:
            due = await conn.fetch(
                "SELECT d.*, r.webhook_secret FROM webhook_deliveries d "
                "JOIN alert_rules r USING (rule_id) WHERE d.delivered_at IS NULL "
                "AND d.next_at <= $1 AND d.attempts < $2 ORDER BY d.id LIMIT 50",
                now,
                MAX_DELIVERY_ATTEMPTS,
            )
        if not due:
            # Most passes: nothing to send, and no client made (one costs ~30 ms of CPU,
            # every 2 s in each of hundreds of idle instances).
            return 0
        delivered = 0
        # No proxy from the environment: the connection goes to the address that was checked.
        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            for row in due:
                stamp = str(int(time.time()))
                headers = {
                    "Content-Type": "application/json",
                    "X-Iotistic-Timestamp": stamp,
                    "X-Iotistic-Signature": sign(row["webhook_secret"] or "", stamp, row["body"]),
                }
                try:
                    async with asyncio.timeout(DELIVERY_SECONDS):
                        error = await self._post(client, row["url"], row["body"], headers)
                except TimeoutError:
                    error = "timed out"
                except Exception as exc:
                    # Not an answer nor a refusal: a failed attempt like any other (retried,
                    # then given up), so it cannot hold back the deliveries after it.
                    log.exception("alerts: delivery %s failed unexpectedly", row["id"])
                    self.errors.labels("deliver").inc()
                    error = f"internal error: {type(exc).__name__}"
                async with self._pool().acquire() as conn:
                    if error is None:
                        delivered += 1
                        await conn.execute(
                            "UPDATE webhook_deliveries SET delivered_at = $2, "
                            "attempts = attempts + 1 WHERE id = $1",
                            row["id"],
                            datetime.now(UTC),
                        )
                    else:
                        backoff = timedelta(seconds=2 ** row["attempts"])
                        await conn.execute(
                            "UPDATE webhook_deliveries SET attempts = attempts + 1, "
                            "last_error = $2, next_at = $3 WHERE id = $1",
                            row["id"],
                            error,
                            datetime.now(UTC) + backoff,
                        )
                self._progress = time.monotonic()
        return delivered

    async def _post(
        self, client: httpx.AsyncClient, url: str, body: str, headers: dict[str, str]
    ) -> str | None:
        """POST to an address the URL resolves to now, checked; None, or what went wrong."""
        try:
            target = await self._targets.resolve(url)
        except WebhookRefused as exc:
            log.warning("webhook refused: %s", exc)
            return f"refused: {exc}"[:500]
        error = "not reachable"
        for address in target.addresses:
            pinned, host, extensions = target.via(address)
            try:
                answer = await client.post(
                    pinned, content=body, headers={**headers, **host}, extensions=extensions
                )
            except httpx.ConnectError:
                error = "ConnectError"
                continue  # the next address the name resolved to, checked as well
            except httpx.HTTPError as exc:
                return type(exc).__name__
            return None if answer.status_code < 300 else f"answered {answer.status_code}"
        return error
