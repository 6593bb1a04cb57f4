"""A reactor's effects reach the log once, however long after its cause it runs again.

Issue 12: reactors appended their effects inside the handler, before their checkpoint
committed. A transaction that failed after the append delivered the cause again, and the same
effect was appended again: JetStream's duplicate window (15 minutes) hid that only when the
retry came soon enough. Here the window is one second, and the reactor's commit really fails
once, more than a second after its handler ran: Postgres refuses it (a deferred trigger).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from contracts import CustomerSignedUp, decode_envelope
from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.runtime.platform import Platform
from services.billing.app import BILLING
from support import eventually

# The reactor's next commit fails, once, after holding its transaction for 1.5 s: longer than
# the stream's duplicate window below.
FAIL_ONE_COMMIT = """
CREATE SEQUENCE billing.commits_seen;
CREATE FUNCTION billing.fail_the_first_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('billing.commits_seen') = 1 THEN
        PERFORM pg_sleep(1.5);
        RAISE EXCEPTION 'this commit is refused once (test)';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER fail_the_first_commit
    AFTER UPDATE ON billing.projection_checkpoints
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (NEW.projection = 'start_trials')
    EXECUTE FUNCTION billing.fail_the_first_commit();
"""


@pytest.fixture
async def fresh(fresh_log: Any) -> tuple[ServiceSettings, EventStore]:
    return await fresh_log(events_duplicate_window_seconds=1)


async def trials_started(store: EventStore, customer_id: str) -> int:
    count = 0
    async for message in store.read(event_types=["TrialStarted"]):
        if decode_envelope(message.data).customer_id == customer_id:
            count += 1
    return count


async def test_a_trial_is_started_once_when_the_reactor_commits_late(fresh) -> None:
    settings, store = fresh
    platform = Platform.from_settings(settings, [BILLING])
    await platform.start()
    conn = await asyncpg.connect(settings.database_url)
    try:
        await platform.wait_started()
        await eventually(platform.readiness, lambda r: r[0], what="billing consuming")
        await conn.execute(FAIL_ONE_COMMIT)
        customer_id = str(uuid.uuid4())
        signed_up = await store.publish(
            CustomerSignedUp(
                customer_id=customer_id,
                email=f"{customer_id}@example.com",
                email_display=f"{customer_id}@example.com",
                company_name="Once Air",
                signed_up_at=datetime.now(UTC),
                trial_days=14,
            ),
            customer_id=customer_id,
        )
        await eventually(
            lambda: conn.fetchval(
                "SELECT last_seq FROM billing.projection_checkpoints "
                "WHERE projection = 'start_trials'"
            ),
            lambda seq: seq is not None and seq >= signed_up.seq,
            timeout=30,
            what="the reactor past the signup",
        )
        assert await conn.fetchval("SELECT last_value FROM billing.commits_seen") >= 2
        # Whatever the reactor decided is on the log once the outbox is empty.
        await eventually(
            lambda: conn.fetchval("SELECT count(*) FROM billing.outbox"),
            lambda n: n == 0,
            what="the outbox relayed",
        )
        await eventually(
            lambda: trials_started(store, customer_id), lambda n: n >= 1, what="the trial"
        )
        assert await trials_started(store, customer_id) == 1
        tasks = (await platform.readiness())[1]["services"]["billing"]["tasks"]
        assert "outbox relay" in tasks
    finally:
        await conn.close()
        await platform.stop()
