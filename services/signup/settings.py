"""Settings of the signup service, on top of the common ones."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from libs.config import ServiceSettings


class SignupSettings(ServiceSettings, frozen=True, kw_only=True):
    """Trial length, how long a signup waits for its license, password hashing, abuse limits,
    the public address its mails link to, and the SMTP server they go through."""

    default_trial_days: Annotated[int, Meta(ge=1, le=90)] = 14
    # How long a signup waits for the license and trial other services answer with; what has
    # not come by then is returned as pending, with a link to follow.
    signup_wait_ms: Annotated[int, Meta(ge=0, le=5000)] = 450
    # argon2id cost. The default is OWASP's minimum (19 MiB, t=2, p=1), about 15 ms a hash here.
    argon2_memory_kib: Annotated[int, Meta(ge=8192)] = 19456
    argon2_time_cost: Annotated[int, Meta(ge=1)] = 2
    argon2_parallelism: Annotated[int, Meta(ge=1, le=16)] = 1
    # Hashing runs in threads, no more than the cores, so it never starves the event loop.
    hash_workers: Annotated[int, Meta(ge=1, le=64)] | None = None
    login_max_failures_per_email: Annotated[int, Meta(ge=1)] = 5
    login_max_failures_per_address: Annotated[int, Meta(ge=1)] = 20
    login_failure_window_seconds: Annotated[int, Meta(ge=1)] = 900
    # Each signup starts an instance (a database, a role, a broker client, ~100 MB): a handful
    # per address lets a person or a small team try the platform, and the overall cap bounds
    # what many addresses together can start.
    signup_max_per_address: Annotated[int, Meta(ge=1)] = 10
    signup_address_window_seconds: Annotated[int, Meta(ge=1)] = 3600
    signup_max_per_hour: Annotated[int, Meta(ge=1)] = 60
    # Proxies in front of the service that append to X-Forwarded-For; 0 trusts none of it.
    trusted_proxy_hops: Annotated[int, Meta(ge=0, le=5)] = 0
    # Instances' dashboards relay sign-ins with the browser's address, signed with a key
    # derived from this (the provisioner hands each instance its own); unset believes none.
    login_relay_secret: Annotated[str, Meta(min_length=32)] | None = None
    # Where the account page's billing forms may be redirected to (Stripe Checkout and the
    # billing portal), space-separated origins for its Content-Security-Policy form-action.
    payment_form_origins: str = "https://checkout.stripe.com https://billing.stripe.com"
    # The control plane's public address, the only base of the links mailed to customers
    # (never the request's Host header, which a client chooses). `iotistic up` sets its own,
    # the chart https://api.<baseDomain>; unset: http://localhost:<HTTP_PORT>.
    public_url: Annotated[str, Meta(pattern=r"^https?://[^\s/?#@]+(/[^\s?#]*)?$")] | None = None
    # Where mail goes. Without SMTP_HOST each mail is written to the log and kept for
    # `iotistic mail tail` (a platform on one machine has no mail server).
    smtp_host: str | None = None
    smtp_port: Annotated[int, Meta(ge=1, le=65535)] = 587
    smtp_user: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = True
    mail_from: Annotated[str, Meta(min_length=3, max_length=200)] = "Iotistic <no-reply@localhost>"
    # Forgotten-password mails: per client address (429 past it) and per email (past it the
    # answer is the same 202, and no mail goes, so nobody can flood a mailbox).
    reset_links_max_per_address: Annotated[int, Meta(ge=1)] = 10
    reset_links_max_per_email: Annotated[int, Meta(ge=1)] = 3
    reset_links_window_seconds: Annotated[int, Meta(ge=60)] = 3600
    # Verification mails a customer may ask for again per window.
    verification_resend_max: Annotated[int, Meta(ge=1)] = 3
