"""What must hold after a fault, with no operator action, and how long it took to hold.

For every signup the client saw succeed (201), and every one it saw fail that reached the
log anyway: exactly one ``CustomerSignedUp``, one ``TrialStarted``, one first license
(``LicenseIssued``, ``trial_signup``), a ``DeploymentSucceeded``, a running instance (its
``/health/ready`` 200) and a working login with the password used. On the whole log: no event
id twice, one ``CustomerSignedUp`` per email, one ``DeploymentSucceeded`` per job. For every
control-plane service: ``iotistic replay <service> --verify`` exits 0. Every process ready.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from libs.sealing.vault import master_key
from tests.chaos.cluster import SERVICES, Cluster, probe_ready
from tests.chaos.load import Attempt

POLL_INTERVAL = 2.0


@dataclass
class Check:
    """One named check: whether it held, and what was seen."""

    name: str
    ok: bool
    detail: str = ""


@dataclass
class Log:
    """The event log as the operator exports it, indexed for the checks."""

    events: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    # An email's subject key on the log (a keyed hash: the event's email is sealed).
    email_subject: Callable[[str], str] = str

    def of(self, event_type: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == event_type]

    def signed_up(self) -> dict[str, list[dict[str, Any]]]:
        """email's subject key → its ``CustomerSignedUp`` events."""
        found: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for event in self.of("CustomerSignedUp"):
            found[event["subject"].rsplit(".", 1)[-1]].append(event)
        return found

    def signed_up_as(self, email: str) -> list[dict[str, Any]]:
        """The ``CustomerSignedUp`` events of ``email``."""
        return self.signed_up().get(self.email_subject(email.lower()), [])

    def count(self, event_type: str, customer_id: str, **fields: object) -> int:
        return sum(
            1
            for e in self.of(event_type)
            if e["customer_id"] == customer_id
            and all(e["data"].get(k) == v for k, v in fields.items())
        )


async def read_log(cluster: Cluster) -> Log:
    """``iotistic events export`` (as the operator): every envelope, ``data`` decoded."""
    out_file = cluster.root / "log.jsonl"
    code, out = await cluster.command("events", "export", "-o", str(out_file), timeout=60)
    if code != 0:
        return Log(error=out.strip().splitlines()[-1] if out.strip() else f"exit {code}")
    log = Log(email_subject=master_key(cluster.env["DATA_KEYS_MASTER_KEY"]).email_subject)
    for line in out_file.read_text().splitlines():
        item = json.loads(line)
        envelope = item.get("envelope")
        if envelope is None:
            log.events.append({"type": "<malformed>", "event_id": None, "customer_id": None})
            continue
        envelope["seq"] = item["seq"]
        envelope["subject"] = item["subject"]
        log.events.append(envelope)
    return log


def expected_customers(attempts: list[Attempt], log: Log) -> list[Attempt]:
    """Signups that must have converged: answered 201, or on the log whatever the answer."""
    return [a for a in attempts if a.status == "201" or log.signed_up_as(a.email)]


async def customer_problems(
    cluster: Cluster, client: httpx.AsyncClient, attempt: Attempt, log: Log
) -> list[str]:
    """What is still wrong with one customer (nothing: converged)."""
    problems: list[str] = []
    signed = log.signed_up_as(attempt.email)
    if len(signed) != 1:
        problems.append(f"{len(signed)} CustomerSignedUp")
    customer_id = signed[0]["customer_id"] if signed else None
    if customer_id is not None:
        for event_type, wanted, fields in (
            ("TrialStarted", "1", {}),
            ("LicenseIssued", "1", {"license_type": "trial_signup"}),
            ("DeploymentSucceeded", ">=1", {}),
        ):
            n = log.count(event_type, customer_id, **fields)
            if (wanted == "1" and n != 1) or (wanted == ">=1" and n < 1):
                problems.append(f"{n} {event_type}" + (" (first license)" if fields else ""))
    try:
        login = await client.post(
            f"{cluster.public_url}/api/customers/login",
            json={"email": attempt.email, "password": attempt.password},
        )
    except httpx.TransportError as exc:
        return [*problems, f"login: {type(exc).__name__}"]
    if login.status_code != 200:
        return [*problems, f"login {login.status_code}"]
    token = login.json()["token"]
    try:
        me = await client.get(
            f"{cluster.public_url}/api/customers/me",
            headers={"Authorization": f"Bearer {token}"},
        )
        deployment = me.json().get("deployment") or {}
    except (httpx.TransportError, ValueError) as exc:
        return [*problems, f"account view: {type(exc).__name__}"]
    url = deployment.get("instance_url")
    if not url:
        return [*problems, f"no instance_url (deployment {deployment.get('status')})"]
    status = await probe_ready(client, url)
    if status != "200":
        problems.append(f"instance ready {status}")
    return problems


@dataclass
class Convergence:
    """How the platform converged after a fault (or what was still wrong at the deadline)."""

    seconds: float | None
    log: Log
    customers: int
    problems: dict[str, list[str]]
    not_ready: dict[str, str]


async def converge(
    cluster: Cluster,
    attempts: list[Attempt],
    timeout: float,
    extra: dict[str, str] | None = None,
    since: float | None = None,
) -> Convergence:
    """Poll until every expected customer is complete and every process (and each URL of
    ``extra``) is ready, or ``timeout`` s pass; the seconds count from ``since`` (now)."""
    began = time.monotonic()
    started = since if since is not None else began
    done: set[str] = set()
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            log = await read_log(cluster)
            problems: dict[str, list[str]] = {}
            expected = expected_customers(attempts, log)
            if log.error is not None:
                problems["(event log)"] = [log.error]
            else:
                pending = [a for a in expected if a.email not in done]
                found = await asyncio.gather(
                    *(customer_problems(cluster, client, a, log) for a in pending)
                )
                for attempt, wrong in zip(pending, found, strict=True):
                    if wrong:
                        problems[f"{attempt.email} ({attempt.status})"] = wrong
                    else:
                        done.add(attempt.email)
            urls = {name: s.url for name, s in cluster.services.items()} | (extra or {})
            statuses = await asyncio.gather(*(probe_ready(client, u) for u in urls.values()))
            not_ready = {n: s for n, s in zip(urls, statuses, strict=True) if s != "200"}
            elapsed = time.monotonic() - started
            if not problems and not not_ready:
                return Convergence(elapsed, log, len(expected), {}, {})
            if time.monotonic() - began > timeout:
                return Convergence(None, log, len(expected), problems, not_ready)
            await asyncio.sleep(POLL_INTERVAL)


def duplicate_checks(log: Log) -> list[Check]:
    """No event id twice; one ``CustomerSignedUp`` per email; one ``DeploymentSucceeded`` per
    deployment job."""
    ids = Counter(e["event_id"] for e in log.events if e.get("event_id"))
    twice = {i: n for i, n in ids.items() if n > 1}
    emails = {m: len(es) for m, es in log.signed_up().items() if len(es) > 1}
    jobs = Counter(e["data"].get("job_id") for e in log.of("DeploymentSucceeded"))
    jobs_twice = {j: n for j, n in jobs.items() if n > 1}
    return [
        Check("no event id twice", not twice, _some(twice)),
        Check("one CustomerSignedUp per email", not emails, _some(emails)),
        Check("one DeploymentSucceeded per job", not jobs_twice, _some(jobs_twice)),
    ]


async def replay_checks(cluster: Cluster) -> list[Check]:
    """``iotistic replay <service> --verify`` exits 0 for each control-plane service."""
    checks = []
    for service in SERVICES:
        code, out = await cluster.command("replay", service, "--verify", timeout=180)
        lines = [line.strip() for line in out.splitlines() if line.strip()]
        checks.append(
            Check(f"replay {service} --verify", code == 0, "; ".join(lines[:6]) if code else "")
        )
    return checks


def _some(found: dict[Any, int]) -> str:
    shown = ", ".join(f"{k}: {n}" for k, n in list(found.items())[:5])
    return f"{len(found)} found ({shown})" if found else ""
