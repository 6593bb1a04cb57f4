"""Rendering a service's pages: its own Jinja templates over the shared layout in this package.

A litestar app has one template engine, and in target ``all`` every service shares one app; so
each service renders with a ``Pages`` of its own (a Jinja ``Environment`` looking first in the
service's folder, then here) and returns the HTML as a response. Autoescape is on for every
template: values shown come from customers and the outside world.

The shared stylesheet and script are served by ``static_files``, at a path a service names:
each service that renders pages serves them under its own prefix (``/static/<service>/``), so
that the chart's gateway routes a prefix to exactly one service.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined, select_autoescape
from litestar import Request, Response
from litestar.datastructures import Cookie
from litestar.static_files import create_static_files_router
from litestar.types import ControllerRouterHandler

from libs.web.forms import CsrfTokens

HERE = Path(__file__).parent
SHARED_TEMPLATES = HERE / "templates"
STATIC = HERE / "static"


def content_security_policy(form_targets: Sequence[str] = ()) -> str:
    """Scripts, styles and images from this origin only; forms post here (or to the origins
    named, where a form's answer redirects: a payment page)."""
    forms = " ".join(("'self'", *form_targets))
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src 'self'; form-action {forms}; frame-ancestors 'none'; base-uri 'none'"
    )


class Pages:
    """The pages of one service: ``render`` a template of its folder with the shared layout."""

    def __init__(
        self, templates: Path, static_prefix: str, brand: str = "Iotistic", home: str = "/"
    ) -> None:
        """``home`` is where the brand in the header leads (the service's main page)."""
        self.static_prefix = static_prefix.rstrip("/")
        self.environment = Environment(
            loader=ChoiceLoader([FileSystemLoader(templates), FileSystemLoader(SHARED_TEMPLATES)]),
            autoescape=select_autoescape(default=True, default_for_string=True),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.environment.globals.update(brand=brand, static=self.static_prefix, home=home)

    def html(self, template: str, context: Mapping[str, Any]) -> str:
        """The template rendered with ``context``."""
        return self.environment.get_template(template).render(**context)

    def form(
        self,
        template: str,
        request: Request[Any, Any, Any],
        csrf: CsrfTokens,
        status_code: int = 200,
        **context: Any,
    ) -> Response[str]:
        """``template`` with a form: a fresh CSRF token as ``csrf_token`` (and the cookie it
        needs, when the browser has none yet)."""
        token, cookies = csrf.issue(request)
        return self.render(template, status_code, cookies=cookies, csrf_token=token, **context)

    def render(
        self,
        template: str,
        status_code: int = 200,
        *,
        cookies: Sequence[Cookie] = (),
        form_targets: Sequence[str] = (),
        **context: Any,
    ) -> Response[str]:
        """An HTML response of ``template``, never cached, with a strict security policy."""
        return Response(
            self.html(template, context),
            status_code=status_code,
            media_type="text/html",  # litestar adds "; charset=utf-8"
            cookies=list(cookies),
            headers={
                "Content-Security-Policy": content_security_policy(form_targets),
                "Cache-Control": "no-store",
                "Referrer-Policy": "same-origin",
                "X-Content-Type-Options": "nosniff",
            },
        )


def static_files(prefix: str) -> ControllerRouterHandler:
    """The shared stylesheet and script (``site.css``, ``site.js``) under ``prefix``."""
    return create_static_files_router(
        path=prefix,
        directories=[STATIC],
        include_in_schema=False,
        cache_control=None,
        name=f"static{prefix.replace('/', '-')}",
    )
