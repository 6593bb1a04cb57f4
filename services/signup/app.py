"""Wiring of the signup service: accounts, credentials and the public signup API."""

from __future__ import annotations

from contracts import CustomerClosed, CustomerSignedUp
from libs.runtime.scheduling import every
from libs.runtime.service import ServiceDefinition, ServiceRuntime
from libs.runtime.supervision import Worker
from services.signup.customer_events import CUSTOMER_EVENTS
from services.signup.private_state import forget_stale_private_state, settle_credentials
from services.signup.projections import ACCOUNTS, INVOICES_AND_USAGE, PLATFORM_CAPACITY
from services.signup.routes import signup_routes
from services.signup.settings import SignupSettings

# How often credentials are brought in line with the account view (cheap: two indexed
# statements that find nothing on a healthy day).
SETTLE_SECONDS = 30.0


def _workers(runtime: ServiceRuntime) -> list[Worker]:
    settings = runtime.settings_as(SignupSettings)

    async def settle_signups() -> int:
        """Credentials follow the log: confirmed once their account exists, dropped once the
        email is another customer's."""
        return await settle_credentials(runtime.db())

    async def sweep_private_state() -> int:
        """Forget rate-limit windows and idempotency answers past their use."""
        await forget_stale_private_state(runtime.db(), settings.login_failure_window_seconds)
        return 0

    return [
        every(SETTLE_SECONDS, "signup: settling credentials", settle_signups),
        every(600, "signup: sweeping stale state", sweep_private_state),
    ]


SIGNUP = ServiceDefinition(
    name="signup",
    migrations_package="services.signup.migrations",
    projections=(ACCOUNTS, PLATFORM_CAPACITY, INVOICES_AND_USAGE, CUSTOMER_EVENTS),
    routes=signup_routes,
    workers=_workers,
    # Every event signup owns, and where it is appended.
    emits=(
        CustomerClosed,  # owned here (ARCHITECTURE.md), though no code appends it yet
        CustomerSignedUp,  # signups.py: the first signup of an email
    ),
    settings_type=SignupSettings,
)
