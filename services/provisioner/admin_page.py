"""``/admin/queues``: the queue for operators in a browser (the original used Bull Board).

Jobs by state, a job's detail with its attempts and errors, and retry and clean buttons. A
browser signs in with HTTP Basic (any user name, the admin token as password); API clients may
send the bearer token instead. The buttons are forms carrying a token derived from the admin
token, which a page on another site cannot read, so it cannot make an admin's browser press them.
Every value shown is escaped: job errors come from the outside world.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from html import escape
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

from litestar import Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.params import FromPath, QueryParameter
from litestar.response import Redirect
from litestar.types import ControllerRouterHandler

from libs.http.auth import bearer, is_admin
from libs.http.errors import InvalidRequest, NotFound
from libs.runtime.service import ServiceRuntime
from services.provisioner.jobs_view import job_view, retry_or_refuse
from services.provisioner.queue import (
    FINISHED,
    STATES,
    clean_jobs,
    queue_stats,
)
from services.provisioner.settings import ProvisionerSettings

REALM = {"WWW-Authenticate": 'Basic realm="Iotistic admin", charset="UTF-8"'}
VIEW_STATES = (*STATES, "superseded")
UNKNOWN = "is not a state of the queue's jobs"
STYLE = """
body{font:14px system-ui,sans-serif;margin:2rem;color:#1d2330}
a{color:#2456c9;text-decoration:none} table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.35rem .6rem;border-bottom:1px solid #e3e6ec;vertical-align:top}
nav a{margin-right:1rem;padding:.2rem .5rem;border-radius:4px}
nav a.on{background:#2456c9;color:#fff} .err{color:#b3261e;white-space:pre-wrap}
form{display:inline} button{cursor:pointer}
"""


def _basic_password(connection: ASGIConnection) -> str | None:  # type: ignore[type-arg]
    scheme, _, value = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        _, _, password = base64.b64decode(value.strip()).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return password


def admin_page_guard(admin_token: str | None) -> Callable[..., None]:
    """Basic (the admin token as password) or Bearer; a browser is asked to sign in."""

    def guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:  # type: ignore[type-arg]
        if not admin_token:
            raise PermissionDeniedException("admin routes are disabled: ADMIN_TOKEN is not set")
        token = bearer(connection) or _basic_password(connection)
        if not is_admin(token, admin_token):
            raise NotAuthorizedException("admin credential required", headers=REALM)

    return guard


def _csrf(admin_token: str) -> str:
    return hmac.new(admin_token.encode(), b"admin-page-form", hashlib.sha256).hexdigest()


def _when(ms: Any) -> str:
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _page(title: str, body: str) -> Response[str]:
    html = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>{body}</body></html>"
    )
    return Response(
        html,
        media_type="text/html",
        headers={
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
            "form-action 'self'; frame-ancestors 'none'",
            "Cache-Control": "no-store",
        },
    )


def _button(action: str, label: str, token: str, extra: str = "") -> str:
    return (
        f"<form method='post' action='{escape(action)}'>"
        f"<input type='hidden' name='csrf' value='{token}'>{extra}"
        f"<button>{escape(label)}</button></form>"
    )


async def _form(request: Request[Any, Any, Any], token: str) -> dict[str, str]:
    body = (await request.body()).decode(errors="replace")
    form = {k: v[0] for k, v in parse_qs(body).items()}
    # Bytes: compare_digest refuses str with anything but ASCII, and a form may hold any.
    if not hmac.compare_digest(form.get("csrf", "").encode(), token.encode()):
        raise PermissionDeniedException("the form is stale or not ours; reload the page")
    return form


def admin_page_routes(
    runtime: ServiceRuntime,
    settings: ProvisionerSettings,
    changed: Callable[[], Awaitable[None]],
) -> list[ControllerRouterHandler]:
    """The admin page's handlers, behind the admin guard."""

    guards = [admin_page_guard(settings.admin_token)]
    token = _csrf(settings.admin_token or "")

    @get("/admin/queues", guards=guards, include_in_schema=False)
    async def queues(
        state_name: Annotated[str, QueryParameter(name="state")] = "waiting",
    ) -> Response[str]:
        state = state_name
        if state not in VIEW_STATES:
            raise InvalidRequest(
                "invalid request", fields=[{"field": "state", "reason": "unknown"}]
            )
        async with runtime.db().acquire() as conn:
            counts = await queue_stats(conn)
            counts["superseded"] = await conn.fetchval(
                "SELECT count(*) FROM queue_jobs WHERE state = 'superseded'"
            )
            paused = await conn.fetchval("SELECT paused FROM queue_control")
            rows = await conn.fetch(
                "SELECT * FROM queue_jobs WHERE state = $1 ORDER BY priority, created_at LIMIT 200",
                state,
            )
        tabs = "".join(
            f"<a class='{'on' if s == state else ''}' href='/admin/queues?state={s}'>"
            f"{s} ({counts[s]})</a>"
            for s in VIEW_STATES
        )
        lines = []
        for row in rows:
            job = job_view(row)
            action = ""
            if job["state"] == "failed":
                action = _button(f"/admin/queues/jobs/{quote(job['id'])}/retry", "retry", token)
            lines.append(
                "<tr>"
                f"<td><a href='/admin/queues/jobs/{quote(job['id'])}'>{escape(job['id'])}</a></td>"
                f"<td>{escape(job['name'])}</td><td>{job['priority']}</td>"
                f"<td>{job['progress']}% {escape(job['step'] or '')}</td>"
                f"<td>{job['attempts']}/{job['maxAttempts']}</td>"
                f"<td>{_when(job['timestamp'])}</td>"
                f"<td class='err'>{escape(job['failedReason'] or '')}</td><td>{action}</td></tr>"
            )
        clean = ""
        if state in FINISHED:
            clean = _button(
                "/admin/queues/clean",
                f"clean all {state} jobs",
                token,
                f"<input type='hidden' name='state' value='{state}'>",
            )
        body = (
            f"<p>{'Paused: no new jobs start.' if paused else 'Running.'}</p><nav>{tabs}</nav>"
            f"<p>{clean}</p><table><tr><th>job</th><th>kind</th><th>priority</th>"
            "<th>progress</th><th>attempts</th><th>queued</th><th>error</th><th></th></tr>"
            f"{''.join(lines) or '<tr><td colspan=8>no jobs</td></tr>'}</table>"
        )
        return _page("Deployment queue", body)

    @get("/admin/queues/jobs/{job_id:str}", guards=guards, include_in_schema=False)
    async def job_detail(job_id: FromPath[str]) -> Response[str]:
        async with runtime.db().acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM queue_jobs WHERE job_id = $1", job_id)
        if row is None:
            raise NotFound(f"no job {job_id}")
        job = job_view(row)
        facts = "".join(
            f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>"
            for k, v in (
                ("state", job["state"]),
                ("kind", job["name"]),
                ("customer", job["data"]["customerId"]),
                ("priority", job["priority"]),
                ("progress", f"{job['progress']}% {job['step'] or ''}"),
                ("attempts", f"{job['attempts']} of {job['maxAttempts']}"),
                ("queued", _when(job["timestamp"])),
                ("first started", _when(job["processedOn"])),
                ("finished", _when(job["finishedOn"])),
                ("superseded by", job["supersededBy"] or ""),
                ("data", json.dumps(job["data"])),
            )
        )
        attempts = "".join(
            f"<tr><td>{escape(str(a.get('attempt')))}</td><td>{escape(str(a.get('worker')))}</td>"
            f"<td>{escape(str(a.get('started_at', '')))}</td>"
            f"<td>{escape(str(a.get('finished_at', '')))}</td>"
            f"<td>{escape(str(a.get('outcome', 'running')))}</td>"
            f"<td class='err'>{escape(str(a.get('error', '')))}</td></tr>"
            for a in job["attemptsLog"]
        )
        retry = ""
        if job["state"] == "failed":
            retry = _button(f"/admin/queues/jobs/{quote(job_id)}/retry", "retry this job", token)
        body = (
            f"<p><a href='/admin/queues?state={job['state']}'>back to {job['state']}</a></p>"
            f"<table>{facts}</table><h2>Attempts</h2><table><tr><th>#</th><th>worker</th>"
            "<th>started</th><th>finished</th><th>outcome</th><th>error</th></tr>"
            f"{attempts or '<tr><td colspan=6>not started yet</td></tr>'}</table><p>{retry}</p>"
        )
        return _page(f"Job {job_id}", body)

    @post("/admin/queues/jobs/{job_id:str}/retry", guards=guards, include_in_schema=False)
    async def retry_from_page(job_id: FromPath[str], request: Request[Any, Any, Any]) -> Redirect:
        await _form(request, token)
        async with runtime.db().acquire() as conn, conn.transaction():
            await retry_or_refuse(conn, job_id, "admin page")
        await changed()
        return Redirect(f"/admin/queues/jobs/{quote(job_id)}", status_code=303)

    @post("/admin/queues/clean", guards=guards, include_in_schema=False)
    async def clean_from_page(request: Request[Any, Any, Any]) -> Redirect:
        form = await _form(request, token)
        state = form.get("state", "")
        if state not in FINISHED:
            raise InvalidRequest(
                "invalid request", fields=[{"field": "state", "reason": "unknown"}]
            )
        async with runtime.db().acquire() as conn, conn.transaction():
            await clean_jobs(conn, state, datetime.now(UTC) + timedelta(seconds=1), "admin page")
        await changed()
        return Redirect(f"/admin/queues?state={state}", status_code=303)

    return [queues, job_detail, retry_from_page, clean_from_page]
