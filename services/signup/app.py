"""Wiring of the signup service: accounts, credentials and the public signup API."""

from __future__ import annotations

from contracts import (
    CredentialsChanged,
    CustomerClosed,
    CustomerErased,
    CustomerSignedUp,
    EmailVerified,
)
from libs.mail.outbox import forget_sent_mail
from libs.projections.apply import Projection
from libs.runtime.outbox import outbox_worker
from libs.runtime.scheduling import every
from libs.runtime.service import ServiceDefinition, ServiceRuntime
from libs.runtime.supervision import Worker
from services.signup.account_billing import INVOICES_AND_USAGE
from services.signup.customer_events import CUSTOMER_EVENTS
from services.signup.mail import forget_spent_links, mail_relay
from services.signup.private_state import forget_stale_private_state, settle_credentials
from services.signup.projections import ACCOUNTS, PLATFORM_CAPACITY
from services.signup.quota_mails import REACTOR as QUOTA_MAILS
from services.signup.quota_mails import quota_mail_reactors
from services.signup.routes import signup_routes
from services.signup.settings import SignupSettings
from services.signup.verification import REACTOR, verification_reactors

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
        return await forget_sent_mail(runtime.db()) + await forget_spent_links(runtime.db())

    return [
        every(SETTLE_SECONDS, "signup: settling credentials", settle_signups),
        every(600, "signup: sweeping stale state", sweep_private_state),
        # EmailVerified, CredentialsChanged and CustomerClosed are decided in signup's database.
        outbox_worker(runtime),
        mail_relay(runtime).worker(),
    ]


def _reactors(runtime: ServiceRuntime) -> list[Projection]:
    settings = runtime.settings_as(SignupSettings)
    wake = mail_relay(runtime).wake
    return [*verification_reactors(settings, wake), *quota_mail_reactors(wake)]


SIGNUP = ServiceDefinition(
    name="signup",
    migrations_package="services.signup.migrations",
    projections=(ACCOUNTS, PLATFORM_CAPACITY, INVOICES_AND_USAGE, CUSTOMER_EVENTS),
    routes=signup_routes,
    workers=_workers,
    reactors=_reactors,
    reactor_names=(REACTOR, QUOTA_MAILS),
    # Every event signup owns, and where it is appended.
    emits=(
        CredentialsChanged,  # recovery.py, through the outbox: a password reset
        CustomerClosed,  # closing.py, through the outbox: the customer closed the account
        CustomerErased,  # erasure.py, through the outbox: a closed customer's data key destroyed
        CustomerSignedUp,  # signups.py: the first signup of an email
        EmailVerified,  # verification.py, through the outbox: a verification link opened
    ),
    settings_type=SignupSettings,
)
