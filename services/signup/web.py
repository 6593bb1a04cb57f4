"""What signup's pages share: their templates, the forms' CSRF tokens and who is signed in.

The pages (``pages.py``: sign up, sign in, the account, whose deployment ``progress.py``
follows; ``recovery_pages.py``: forgotten passwords, email verification, closing an account;
``admin_pages.py``: operators' customers page) render ``templates/`` over the layout in
``libs/web`` and call the same commands as the JSON API, so the same checks and rate limits
hold. The stylesheet and script are served under ``STATIC_PREFIX``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg
from litestar import Request
from litestar.response import Redirect

from libs.http.auth import SessionTokens
from libs.web.forms import session_token
from libs.web.pages import Pages
from services.signup.recovery_sessions import customer_in_session

STATIC_PREFIX = "/static/signup"
PAGES = Pages(Path(__file__).parent / "templates", STATIC_PREFIX, home="/account")


async def signed_in(
    request: Request[Any, Any, Any], sessions: SessionTokens, pool: asyncpg.Pool
) -> str | None:
    """The customer whose session cookie the browser carries, if it is valid and signup still
    honours it (not issued before a password reset, not of a closed account)."""
    return await customer_in_session(pool, sessions, session_token(request))


def to_sign_in(next_path: str = "/account") -> Redirect:
    """Off to the sign-in page, coming back to ``next_path`` (a path of ours) after."""
    return Redirect(f"/login?{urlencode({'next': next_path})}", status_code=303)
