"""``/admin/queues``: the queue for operators in a browser (the original used Bull Board).

Jobs by state, a job's detail with its attempts and errors, and retry and clean buttons. A
browser signs in with HTTP Basic (any user name, the admin token as password); API clients may
send the bearer token instead. The buttons are forms carrying a token derived from the admin
token, which a page on another site cannot read, so it cannot make an admin's browser press them.
The pages are Jinja templates (``templates/admin/``) with autoescape on: every value shown is
escaped, and job errors come from the outside world.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from litestar import Controller, MediaType, Request, Response, Router, get, post
from litestar.di import NamedDependency, Provide
from litestar.exceptions import PermissionDeniedException
from litestar.params import FromPath, QueryParameter
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect

from libs.http.auth import admin_page_guard
from libs.http.validation import FieldErrors
from services.provisioner.deployments import Provisioning
from services.provisioner.jobs_view import (
    counts_and_pause,
    find_job,
    job_view,
    jobs_in_state,
    retry_or_refuse,
)
from services.provisioner.queue import clean_jobs
from services.provisioner.queue_rules import FINISHED, STATES

VIEW_STATES = (*STATES, "superseded")
TEMPLATES = Path(__file__).parent / "templates"
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
}


def csrf_token(admin_token: str) -> str:
    """The token the page's forms carry: derived from the admin token, so another site's page
    cannot know it."""
    return hmac.new(admin_token.encode(), b"admin-page-form", hashlib.sha256).hexdigest()


def when(ms: Any) -> str:
    """An epoch-milliseconds time as the page shows it (UTC), or nothing."""
    if not ms:
        return ""
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def admin_templates() -> JinjaTemplateEngine:
    """The admin page's templates, every value escaped."""
    environment = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["when"] = when
    return JinjaTemplateEngine.from_environment(environment)


class AdminPage:
    """What the page's handlers work with: the queue, its templates and the forms' token."""

    def __init__(self, provisioning: Provisioning, admin_token: str | None) -> None:
        self.provisioning = provisioning
        self.csrf = csrf_token(admin_token or "")
        self.templates = admin_templates()

    def render(self, name: str, title: str, **context: Any) -> Response[str]:
        """A page, never cached, and allowed neither scripts nor frames.

        Rendered here rather than by a litestar ``Template`` response, which needs the app's
        template config: the app is the platform's (``libs/http/app.py``), this page the
        provisioner's alone."""
        html = self.templates.get_template(name).render(title=title, csrf=self.csrf, **context)
        return Response(html, media_type=MediaType.HTML, headers=HEADERS)

    async def checked_form(self, request: Request[Any, Any, Any]) -> dict[str, str]:
        """The form's fields, once its CSRF token is found to be the page's (else 403)."""
        received = await request.form()
        form = {name: str(received.get(name)) for name in received}  # a name's first value
        # Bytes: compare_digest refuses str with anything but ASCII, and a form may hold any.
        if not hmac.compare_digest(form.get("csrf", "").encode(), self.csrf.encode()):
            raise PermissionDeniedException("the form is stale or not ours; reload the page")
        return form


def known_state(state: str, states: tuple[str, ...]) -> str:
    """``state`` if it is one of ``states``, else a 400 naming the field."""
    errors = FieldErrors()
    if state not in states:
        errors.add("state", "unknown")
    errors.raise_if_any()
    return state


class AdminPageController(Controller):
    """The page's handlers; ``admin_page_router`` puts them behind the admin page's guard."""

    path = "/admin/queues"
    include_in_schema = False

    @get("/")
    async def queues(
        self,
        page: NamedDependency[AdminPage],
        state_name: Annotated[str, QueryParameter(name="state")] = "waiting",
    ) -> Response[str]:
        """The jobs in one state, with a tab for each state."""
        state = known_state(state_name, VIEW_STATES)
        async with page.provisioning.db().acquire() as conn:
            counts, paused = await counts_and_pause(conn)
            rows = await jobs_in_state(conn, state)
        return page.render(
            "admin/queues.html",
            "Deployment queue",
            state=state,
            states=VIEW_STATES,
            finished=FINISHED,
            counts=counts,
            paused=paused,
            jobs=[job_view(row) for row in rows],
        )

    @get("/jobs/{job_id:str}")
    async def job_detail(
        self, job_id: FromPath[str], page: NamedDependency[AdminPage]
    ) -> Response[str]:
        """One job: its facts, its attempts and their errors."""
        async with page.provisioning.db().acquire() as conn:
            row = await find_job(conn, job_id)
        job = job_view(row)
        return page.render("admin/job.html", f"Job {job_id}", job=job, data=json.dumps(job["data"]))

    @post("/jobs/{job_id:str}/retry")
    async def retry_from_page(
        self,
        job_id: FromPath[str],
        request: Request[Any, Any, Any],
        page: NamedDependency[AdminPage],
    ) -> Redirect:
        """Retry a failed job, then show it."""
        await page.checked_form(request)
        async with page.provisioning.db().acquire() as conn, conn.transaction():
            await retry_or_refuse(conn, job_id, "admin page")
        page.provisioning.wake()
        return Redirect(f"/admin/queues/jobs/{quote(job_id)}", status_code=303)

    @post("/clean")
    async def clean_from_page(
        self, request: Request[Any, Any, Any], page: NamedDependency[AdminPage]
    ) -> Redirect:
        """Remove every finished job of a state, then show that state."""
        form = await page.checked_form(request)
        state = known_state(form.get("state", ""), FINISHED)
        # A second from now: what finished this very second goes too.
        before = datetime.now(UTC) + timedelta(seconds=1)
        async with page.provisioning.db().acquire() as conn, conn.transaction():
            await clean_jobs(conn, state, before, "admin page")
        page.provisioning.wake()
        return Redirect(f"/admin/queues?state={state}", status_code=303)


def admin_page_router(provisioning: Provisioning) -> Router:
    """The admin page behind its guard (Basic or Bearer, the admin token)."""
    admin_token = provisioning.settings.admin_token
    page = AdminPage(provisioning, admin_token)
    return Router(
        path="/",
        route_handlers=[AdminPageController],
        guards=[admin_page_guard(admin_token)],
        dependencies={"page": Provide(lambda: page, sync_to_thread=False)},
    )
