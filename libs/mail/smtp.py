"""Handing one mail to an SMTP server (the standard library's smtplib, in a thread), or, where
none is configured, to the log.

Where an SMTP host is set, a mail goes there, over STARTTLS unless switched off; a server that
is down or refuses raises ``MailNotSent``, and the relay tries again later. Without a host, the
mail is "written": one line in the log says so, to whom and its subject, and the mail stays in
the service's mail table, where ``iotistic mail tail`` shows it (a platform on one machine, for
development, has no SMTP server).
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

log = logging.getLogger(__name__)

# smtplib's errors and the socket's: the server is away, slow or refusing.
SMTP_ERRORS: tuple[type[BaseException], ...] = (smtplib.SMTPException, OSError, TimeoutError)


class MailNotSent(Exception):
    """The SMTP server did not take the mail; the message says why (never the body).
    ``permanent`` when it refused this mail for good (every recipient refused with a 5xx, or
    the message itself), so that trying again cannot help; otherwise it may take it later."""

    def __init__(self, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.permanent = permanent


def refused_for_good(exc: BaseException) -> bool:
    """Whether an SMTP error refuses this mail for good: every recipient refused with a 5xx,
    or the data refused with one. A refused sender or sign-in is the platform's configuration,
    which an operator fixes: those are tried again."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return bool(exc.recipients) and all(code >= 500 for code, _ in exc.recipients.values())
    return isinstance(exc, smtplib.SMTPDataError) and exc.smtp_code >= 500


@dataclass(frozen=True)
class Mail:
    """One mail: to whom, its subject and its plain-text body."""

    to: str
    subject: str
    body: str


@dataclass(frozen=True)
class SmtpServer:
    """Where mail goes: an SMTP server, and the sender's address."""

    host: str
    port: int = 587
    user: str | None = None
    password: str | None = None
    sender: str = "no-reply@localhost"
    starttls: bool = True
    timeout_seconds: float = 20.0

    def __repr__(self) -> str:  # the password never reaches a log line
        return f"SmtpServer(host={self.host!r}, port={self.port}, user={self.user!r})"


def message_of(mail: Mail, sender: str) -> EmailMessage:
    """``mail`` as an RFC 5322 message from ``sender``."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = mail.to
    message["Subject"] = mail.subject
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or "localhost")
    message.set_content(mail.body)
    return message


def _send_blocking(server: SmtpServer, mail: Mail) -> None:
    with smtplib.SMTP(server.host, server.port, timeout=server.timeout_seconds) as smtp:
        smtp.ehlo()
        if server.starttls:
            smtp.starttls(context=ssl.create_default_context())
            smtp.ehlo()
        if server.user:
            smtp.login(server.user, server.password or "")
        smtp.send_message(message_of(mail, server.sender))


class MailTransport:
    """Delivers mail: to ``server`` when given, else to the log (``delivered_by`` says which)."""

    def __init__(self, server: SmtpServer | None) -> None:
        """``server`` None writes each mail to the log instead of sending it."""
        self.server = server

    @property
    def delivered_by(self) -> str:
        """``smtp`` or ``log``: what a sent mail's row records."""
        return "smtp" if self.server is not None else "log"

    async def deliver(self, mail: Mail) -> None:
        """Send ``mail``; ``MailNotSent`` when the server cannot take it now."""
        if self.server is None:
            # Not its address: a log line outlives an erasure of the person it names.
            log.info(
                "mail not sent (no SMTP server): %s (iotistic mail tail shows it)", mail.subject
            )
            return
        try:
            await asyncio.to_thread(_send_blocking, self.server, mail)
        except SMTP_ERRORS as exc:
            raise MailNotSent(
                f"{type(exc).__name__}: {exc}", permanent=refused_for_good(exc)
            ) from exc
