"""Which sessions licensing still honours, from the log.

Session tokens are checked by signature and expiry (``libs/http/auth.py``); that alone would let
a stolen or old session read a customer's license for up to an hour after a password reset or a
closure. So licensing projects signup's ``CredentialsChanged`` and ``CustomerClosed`` into
``account_access`` and refuses, with the same 401 as an expired session, a token issued before
the customer's latest cut-off or of a closed account. (Revoking a closed account's license is
the license reactor's, which keeps its own state: ``reactors.py``.)
"""

from __future__ import annotations

from contracts import CredentialsChanged, CustomerClosed
from libs.db.postgres import Connection
from libs.http.honoured_sessions import HonouredSessions, cut_off_sessions, record_closure
from libs.projections.apply import Projection, Recorded

# The sessions this service honours (``libs/http/honoured_sessions.py``), from the table below.
CustomerSessions = HonouredSessions


async def when_credentials_changed_cut_off_sessions(
    conn: Connection, r: Recorded[CredentialsChanged]
) -> None:
    await cut_off_sessions(conn, r.event.customer_id, r.event.sessions_valid_from)


async def when_customer_closed_record_it(conn: Connection, r: Recorded[CustomerClosed]) -> None:
    await record_closure(conn, r.event.customer_id, r.envelope.occurred_at)


ACCOUNT_ACCESS = Projection(
    name="account_access",
    tables=("account_access",),
    handlers={
        CredentialsChanged: when_credentials_changed_cut_off_sessions,
        CustomerClosed: when_customer_closed_record_it,
    },
)
