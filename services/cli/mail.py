"""``iotistic mail``: the mail a service wrote to its outbox, for a platform without an SMTP
server (``iotistic up``): with no ``SMTP_HOST``, signup writes each mail to the log and keeps it
in its ``mail_outbox`` table, where ``mail tail`` shows it, links and all."""

from __future__ import annotations

import argparse
import asyncio

import asyncpg

from libs.mail.outbox import KeptMail, last_mail_ids, read_mail
from services.cli.environment import settings_from

FOLLOW_POLL_SECONDS = 0.5


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``mail``'s commands and their arguments."""
    mail = subparsers.add_parser("mail", help="read the mail the platform sent or wrote")
    commands = mail.add_subparsers(dest="mail_command", required=True)
    tail = commands.add_parser(
        "tail", help="the latest mails, whole (bodies of mail sent over SMTP are not kept)"
    )
    tail.add_argument(
        "-n", "--lines", type=int, default=10, help="how many of the latest (default: %(default)s)"
    )
    tail.add_argument("-f", "--follow", action="store_true", help="then print mail as it comes")
    tail.add_argument("--service", default="signup", help="whose outbox (default: %(default)s)")
    tail.set_defaults(func=cmd_mail_tail)


def shown(mail: KeptMail) -> str:
    """A mail as ``mail tail`` prints it."""
    if mail.given_up_at is not None:
        state = f"given up at {mail.given_up_at.isoformat()} ({mail.last_error})"
    elif mail.sent_at is None:
        state = (
            f"waiting (tries: {mail.attempts}{'; ' + mail.last_error if mail.last_error else ''})"
        )
    else:
        state = f"sent by {mail.delivered_by} at {mail.sent_at.isoformat()}"
    body = mail.body if mail.body is not None else "(body not kept: sent over SMTP, or given up)"
    return (
        f"--- mail {mail.id}, {mail.created_at.isoformat()}, {state}\n"
        f"To: {mail.recipient}\nSubject: {mail.subject}\n\n{body.rstrip()}\n"
    )


def cmd_mail_tail(args: argparse.Namespace) -> int:
    """``iotistic mail tail``: print the latest mails, then follow with ``-f``."""
    settings = settings_from(args, needs=("DATABASE_URL",))

    async def go() -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            after = await last_mail_ids(conn, args.service, max(args.lines, 0))
            while True:
                for mail in await read_mail(conn, args.service, after):
                    print(shown(mail), flush=True)
                    after = mail.id
                if not args.follow:
                    return
                await asyncio.sleep(FOLLOW_POLL_SECONDS)
        finally:
            await conn.close()

    asyncio.run(go())
    return 0
