"""Wiring of the signup service: accounts, credentials and the public signup API."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from contracts import CustomerClosed, CustomerSignedUp
from libs.db import CONNECTION_ERRORS
from libs.runtime import ServiceDefinition, ServiceRuntime
from services.signup.handlers import forget_stale_private_state
from services.signup.projections import ACCOUNTS
from services.signup.routes import signup_routes
from services.signup.settings import SignupSettings

log = logging.getLogger(__name__)


def _workers(runtime: ServiceRuntime) -> list[Callable[[], Awaitable[None]]]:
    settings = runtime.settings_as(SignupSettings)

    async def sweep_private_state() -> None:
        """Every ten minutes, forget rate-limit windows and idempotency answers past their use."""
        while True:
            await asyncio.sleep(600)
            try:
                await forget_stale_private_state(
                    runtime.db(), settings.login_failure_window_seconds
                )
            except CONNECTION_ERRORS as exc:
                log.warning("signup: sweeping stale state failed (%r); next time", exc)

    return [sweep_private_state]


SIGNUP = ServiceDefinition(
    name="signup",
    migrations_package="services.signup.migrations",
    projections=(ACCOUNTS,),
    routes=signup_routes,
    workers=_workers,
    emits=(
        CustomerClosed,
        CustomerSignedUp,
    ),
    settings_type=SignupSettings,
)
