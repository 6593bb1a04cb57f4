"""Signup's mail: the one-time links it mails (verify an email, reset a password), their texts,
and the relay that delivers them (``libs/mail``) from signup's own database.

A link's token is random (256 bits), only its SHA-256 is stored, with its purpose, customer and
expiry, and it is used once. Links are built on ``PUBLIC_URL``, never on the request's Host
header: a client chooses that header, and would have a victim mailed a link to its own site.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from typing import Literal

import asyncpg

from libs.mail.outbox import MailRelay, queue_mail
from libs.mail.smtp import Mail, MailTransport, SmtpServer
from libs.runtime.service import ServiceRuntime
from services.signup.settings import SignupSettings

Purpose = Literal["verify_email", "reset_password"]
VERIFY_PATH = "/verify"
RESET_PATH = "/reset"
VERIFY_VALID = timedelta(days=2)
RESET_VALID = timedelta(hours=1)
# A token as this module makes them (token_urlsafe(32)): anything else is refused unread.
TOKEN_MAX = 128


def public_url(settings: SignupSettings) -> str:
    """The base of every link mailed: ``PUBLIC_URL``, else this process on localhost."""
    return (settings.public_url or f"http://localhost:{settings.http_port}").rstrip("/")


def smtp_server(settings: SignupSettings) -> SmtpServer | None:
    """The SMTP server of the settings, or None to write mail to the log instead."""
    if not settings.smtp_host:
        return None
    return SmtpServer(
        host=settings.smtp_host,
        port=settings.smtp_port,
        user=settings.smtp_user,
        password=settings.smtp_password,
        sender=settings.mail_from,
        starttls=settings.smtp_starttls,
    )


def mail_relay(runtime: ServiceRuntime) -> MailRelay:
    """Signup's mail relay (one per service runtime: its routes wake it, its worker runs it)."""
    settings = runtime.settings_as(SignupSettings)
    return runtime.shared(
        "mail relay", lambda: MailRelay(runtime.db, MailTransport(smtp_server(settings)))
    )


def token_hash(token: str) -> str:
    """What is stored of a link's token."""
    return hashlib.sha256(token.encode()).hexdigest()


def plausible_token(token: object) -> bool:
    """Whether ``token`` could be one of ours (shape only; the table decides)."""
    return (
        isinstance(token, str)
        and 20 <= len(token) <= TOKEN_MAX
        and all(c.isalnum() or c in "-_" for c in token)
    )


async def issue_link(
    conn: asyncpg.Connection,
    settings: SignupSettings,
    purpose: Purpose,
    customer_id: str,
    email: str,
    valid_for: timedelta,
) -> str:
    """A new one-time link for ``purpose``, its token stored hashed in the caller's transaction."""
    token = secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO account_tokens (token_hash, purpose, customer_id, email, expires_at) "
        "VALUES ($1, $2, $3, $4, now() + $5::interval)",
        token_hash(token),
        purpose,
        customer_id,
        email,
        valid_for,
    )
    path = VERIFY_PATH if purpose == "verify_email" else RESET_PATH
    return f"{public_url(settings)}{path}?token={token}"


async def mail_verification_link(
    conn: asyncpg.Connection, settings: SignupSettings, customer_id: str, email: str
) -> None:
    """Queue the mail that asks the customer to verify ``email`` (in the caller's transaction)."""
    link = await issue_link(conn, settings, "verify_email", customer_id, email, VERIFY_VALID)
    await queue_mail(
        conn,
        Mail(
            to=email,
            subject="Confirm your email address for Iotistic",
            body=(
                "Welcome to Iotistic.\n\n"
                "Please confirm that this is your email address by opening this link:\n\n"
                f"{link}\n\n"
                "The link works once, for 2 days. Your account works meanwhile; confirming "
                "lets us reach you about your instance and your bill.\n\n"
                "If you did not sign up, ignore this mail.\n"
            ),
        ),
    )


async def mail_reset_link(
    conn: asyncpg.Connection, settings: SignupSettings, customer_id: str, email: str
) -> None:
    """Queue the mail with a link to set a new password (in the caller's transaction)."""
    link = await issue_link(conn, settings, "reset_password", customer_id, email, RESET_VALID)
    await queue_mail(
        conn,
        Mail(
            to=email,
            subject="Reset your Iotistic password",
            body=(
                "Someone (we hope you) asked to reset the password of your Iotistic account.\n\n"
                "To choose a new password, open this link:\n\n"
                f"{link}\n\n"
                "The link works once, for 1 hour. Setting a new password signs out every "
                "browser and program signed in with the old one.\n\n"
                "If you did not ask for this, ignore this mail: your password stays as it is.\n"
            ),
        ),
    )


async def forget_spent_links(pool: asyncpg.Pool, keep_days: int = 7) -> int:
    """Drop links expired more than ``keep_days`` ago (a used reset link is kept until then, so
    a retried confirm still finds it); returns how many."""
    rows = await pool.fetch(
        "DELETE FROM account_tokens WHERE expires_at < now() - make_interval(days => $1) "
        "RETURNING token_hash",
        keep_days,
    )
    return len(rows)
