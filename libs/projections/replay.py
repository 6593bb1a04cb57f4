"""Rebuilding a service's read models from the log, or checking the live ones against it.

``replay_service`` is what ``iotistic replay`` runs. A rebuild always happens in a scratch schema
first (``libs/projections/rebuild.py``), built by the same migrations and the same projection
code as the live one. Then ``verify`` checks the live read models against it
(``libs/projections/verify.py``), a dry run only reports, and a real replay swaps the rebuilt
rows in.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from libs.db.postgres import migrate, service_migrations
from libs.eventlog.store import EventStore
from libs.projections.apply import Projection
from libs.projections.rebuild import Progress, Rebuild, refuse_partial_swap
from libs.projections.reports import ReplayReport
from libs.projections.verify import VERIFY_WAIT_SECONDS, verify_live


async def replay_service(
    conn: asyncpg.Connection,
    store: EventStore,
    *,
    schema: str,
    migrations_package: str,
    projections: Sequence[Projection],
    from_seq: int = 1,
    dry_run: bool = False,
    verify: bool = False,
    wait: float = VERIFY_WAIT_SECONDS,
    progress: Progress | None = None,
) -> ReplayReport:
    """Rebuild a service's read models from the log (see the module's docstring).

    ``dry_run`` rebuilds and reports without touching the live tables. ``verify`` takes the
    head of the log, waits up to ``wait`` seconds for the live projections to reach it, and
    reports each one's checkpoint and lag (``ReplayReport.checks``) and every row that differs
    from a rebuild to the same checkpoint. A ``from_seq`` after 1 is for those two only:
    ``ReplayError`` otherwise, before anything is touched.
    """
    if not (dry_run or verify):
        refuse_partial_swap(from_seq)
    report = ReplayReport(service=schema)
    rebuild = Rebuild(conn, store, schema, migrations_package, projections, from_seq, progress)
    # The live schema must exist (migrated) for checkpoints and the swap; a service that never
    # ran gets its tables here.
    await migrate(conn, schema, service_migrations(migrations_package))
    await rebuild.prepare()
    try:
        if verify:
            await verify_live(rebuild, report, wait)
        else:
            end = await store.last_seq()
            await rebuild.catch_up({p.name: end for p in projections}, report)
            if not dry_run:
                await rebuild.swap_in(report)
    finally:
        await rebuild.cleanup()
    return report
