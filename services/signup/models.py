"""What the signup API takes and answers, and the checks on what it takes."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

import msgspec
from email_validator import EmailNotValidError, validate_email

from contracts import Features
from libs.http.errors import InvalidRequest
from libs.http.validation import FieldErrors, json_object
from services.signup.passwords import is_common

EMAIL_MAX = 254
PASSWORD_MIN = 8
PASSWORD_MAX = 128
NAME_MAX = 200


class SignupForm(msgspec.Struct, frozen=True, kw_only=True):
    """A signup that passed every check."""

    email: str
    email_display: str
    password: str
    company_name: str
    full_name: str | None = None


class LoginForm(msgspec.Struct, frozen=True, kw_only=True):
    """A login as sent (checked for shape only: what is wrong with it must not be told)."""

    email: str
    password: str


class CustomerOut(msgspec.Struct, frozen=True, kw_only=True):
    customer_id: str
    email: str
    company_name: str


class SubscriptionOut(msgspec.Struct, frozen=True, kw_only=True):
    plan: str
    status: str
    trial_ends_at: datetime | None
    trial_days_remaining: int | None


class LicenseOut(msgspec.Struct, frozen=True, kw_only=True):
    status: Literal["active", "pending"]
    jwt: str | None
    expires_at: datetime | None
    features: Features | None
    plan: str | None = None


class DeploymentOut(msgspec.Struct, frozen=True, kw_only=True):
    status: str
    job_id: str | None
    instance_url: str | None
    estimated_time: str | None
    check_status_url: str
    progress: int = 0
    step: str | None = None
    error: str | None = None
    # What the status means for the customer, in a sentence (while waiting for capacity).
    detail: str | None = None
    # While the instance is degraded, or recovering from it: since when, and what was seen.
    degraded_since: datetime | None = None
    health_reason: str | None = None


class SignupAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """The 201 of a signup, in the original design's shape."""

    message: str
    customer: CustomerOut
    subscription: SubscriptionOut
    license: LicenseOut
    deployment: DeploymentOut


class LoginAnswer(msgspec.Struct, frozen=True, kw_only=True):
    customer_id: str
    email: str
    license: LicenseOut
    token: str
    token_expires_in: int


class InvoiceOut(msgspec.Struct, frozen=True, kw_only=True):
    """One invoice as Stripe last reported it; ``url`` is its page at Stripe."""

    number: str | None
    status: str
    amount: int  # in the currency's minor unit (cents)
    currency: str
    created_at: datetime
    url: str | None


class UsageOut(msgspec.Struct, frozen=True, kw_only=True):
    """The newest UTC day the instance reported, against the license's limits (None where
    the license sets none or none is issued yet)."""

    day: date
    devices: int
    messages: int
    api_requests: int
    max_devices: int | None
    messages_per_day: int | None
    api_requests_per_day: int | None


class AccountView(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /api/customers/me``: everything the platform knows about the customer."""

    customer: CustomerOut
    full_name: str | None
    signed_up_at: datetime
    subscription: SubscriptionOut
    license: LicenseOut
    deployment: DeploymentOut
    closed_at: datetime | None
    # Newest first, at most ACCOUNT_INVOICES (account_view.py).
    invoices: list[InvoiceOut] = msgspec.field(default_factory=list)
    # None until the instance has reported a day.
    usage: UsageOut | None = None
    # Whether the customer opened the verification link mailed to their address (an
    # unverified account works all the same).
    email_verified: bool = False


def check_email(value: str, errors: FieldErrors) -> str | None:
    """The email lower-cased, or None with the reason recorded in ``errors``."""
    try:
        validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        errors.add("email", str(exc))
        return None
    return value.lower()


def check_password(password: Any, errors: FieldErrors) -> str | None:
    """A new password, or None with the reason recorded in ``errors``."""
    if password is None:
        errors.add("password", "is required")
    elif not isinstance(password, str):
        errors.add("password", "must be a string")
    elif len(password) < PASSWORD_MIN:
        errors.add("password", f"must be at least {PASSWORD_MIN} characters")
    elif len(password) > PASSWORD_MAX:
        errors.add("password", f"must be at most {PASSWORD_MAX} characters")
    elif is_common(password):
        errors.add("password", "is too common; choose another")
    else:
        return password
    return None


def parse_signup(data: Any) -> SignupForm:
    """Check a signup body, raising a 400 that names every bad field at once."""
    body = json_object(data)
    errors = FieldErrors()
    errors.unknown(body, {"email", "password", "company_name", "full_name"})
    display = errors.text(body, "email", required=True, limit=EMAIL_MAX)
    email = check_email(display, errors) if display is not None else None
    password = check_password(body.get("password"), errors)
    company = errors.text(body, "company_name", required=True, limit=NAME_MAX)
    full_name = errors.text(body, "full_name", required=False, limit=NAME_MAX)
    if errors or email is None or display is None or password is None or company is None:
        raise InvalidRequest("invalid request", fields=errors.fields)
    return SignupForm(
        email=email,
        email_display=display,
        password=password,
        company_name=company,
        full_name=full_name or None,
    )


def parse_login(data: Any) -> LoginForm:
    """Check a login body's shape (400); whether it is right is for the 401 to say."""
    body = json_object(data)
    errors = FieldErrors()
    errors.unknown(body, {"email", "password"})
    email = errors.text(body, "email", required=True, limit=EMAIL_MAX)
    password = body.get("password")
    if not isinstance(password, str) or not password:
        errors.add("password", "is required")
    elif len(password) > PASSWORD_MAX:
        errors.add("password", f"must be at most {PASSWORD_MAX} characters")
    if errors or email is None or not isinstance(password, str):
        raise InvalidRequest("invalid request", fields=errors.fields)
    return LoginForm(email=email.lower(), password=password)
