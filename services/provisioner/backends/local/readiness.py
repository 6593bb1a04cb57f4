"""Whether an instance answers ready: its ``/health/ready``, asked with its monitoring token
(to monitoring it shows which check failed, and which license it holds)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import httpx

from services.provisioner.backends.base import BackendError, InstanceHealth
from services.provisioner.backends.local.processes import Supervised


async def probe(
    client: httpx.AsyncClient, url: str, token: str, timeout: float
) -> tuple[InstanceHealth, dict[str, object]]:
    """The health of the instance at ``url``, and the detail of its readiness answer."""
    try:
        answer = await client.get(
            f"{url}/health/ready",
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )
    except httpx.HTTPError as exc:
        return InstanceHealth(False, f"not answering: {type(exc).__name__}"), {}
    try:
        detail = answer.json()
    except ValueError:
        detail = None
    detail = detail if isinstance(detail, dict) else {}
    if answer.status_code == 200:
        return InstanceHealth(True), detail
    failed = [
        str(name)[:40]
        for name, check in detail.items()
        if isinstance(check, dict) and check.get("ok") is False
    ]
    reason = f"not ready ({answer.status_code}): {', '.join(failed[:10]) or 'no detail'}"
    return InstanceHealth(False, reason), detail


async def wait_ready(
    client: httpx.AsyncClient,
    s: Supervised,
    url: str,
    token: str,
    license_id: str,
    timeout: float,
) -> None:
    """Wait until the instance ``s`` at ``url`` answers ready with the license ``license_id``;
    ``BackendError`` when it exits while starting or after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    resend = loop.time()
    # The instance shows which license it holds only to monitoring.
    headers = {"Authorization": f"Bearer {token}"}
    while loop.time() < deadline:
        if s.process is not None and s.exited.is_set():
            break  # it died while starting: this attempt failed
        with contextlib.suppress(httpx.HTTPError, ValueError, AttributeError):
            answer = await client.get(f"{url}/health/ready", headers=headers, timeout=2)
            held = (answer.json().get("license") or {}).get("license_id")
            if held == license_id:
                if answer.status_code == 200:
                    return
            elif loop.time() >= resend and s.pid is not None:
                # It answers with another license: have it re-read the file. Never
                # signal an instance that does not answer yet: it reads the file as
                # it starts, and a SIGHUP before its handler is set would end it.
                os.kill(s.pid, signal.SIGHUP)
                resend = loop.time() + 2.0
        await asyncio.sleep(0.1)
    code = s.process.returncode if s.process is not None else None
    if code is not None:
        raise BackendError(f"the instance exited with code {code} while starting")
    raise BackendError(
        f"the instance did not become ready with license {license_id} within {timeout:.0f}s"
    )
