"""Projections against real Postgres and JetStream: checkpoints, redelivery, crashes, poison.

The licensing service's real ``licenses`` projection is the subject under test; events are put
on the log the way services put them there.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import api
from tcp_relay import TcpRelay

from contracts import new_envelope
from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.projections.replay import replay_service
from libs.projections.reports import ReplayError, ReplayReport
from libs.runtime.platform import Platform
from libs.servers.ports import free_port
from services.licensing.app import LICENSING
from support import (
    connect_harness,
    eventually,
    license_issued,
    license_keys_dir,
    make_platform,
)

PROJECTION = "licenses"


@pytest.fixture
async def fresh(fresh_log: Any) -> tuple[ServiceSettings, EventStore]:
    """A database and a stream of this test's own."""
    return await fresh_log()


@pytest.fixture
async def db(fresh: tuple[ServiceSettings, EventStore]) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(
        fresh[0].database_url, server_settings={"search_path": "licensing"}
    )
    yield conn
    await conn.close()


def licenses_check(report: Any) -> Any:
    """The report's check of the ``licenses`` projection (licensing has others, which these
    events, all LicenseIssued, leave at their head)."""
    [check] = [c for c in report.checks if c.projection == PROJECTION]
    others = [c for c in report.checks if c.projection != PROJECTION]
    assert all(c.lag == 0 for c in others), others
    return check


async def start(settings: ServiceSettings) -> Platform:
    platform = make_platform(settings, [LICENSING])
    await platform.start()
    await platform.wait_started()
    return platform


async def publish_licenses(store: EventStore, count: int) -> list[int]:
    seqs = []
    for _ in range(count):
        event = license_issued()
        seqs.append((await store.publish(event, customer_id=event.customer_id)).seq)
    return seqs


async def checkpoint(db: asyncpg.Connection) -> int:
    value = await db.fetchval(
        "SELECT last_seq FROM projection_checkpoints WHERE projection = $1", PROJECTION
    )
    return int(value or 0)


async def caught_up(db: asyncpg.Connection, seq: int) -> None:
    await eventually(lambda: checkpoint(db), lambda c: c >= seq, what=f"checkpoint {seq}")


async def verify(settings: ServiceSettings, store: EventStore, **kw: object) -> ReplayReport:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return await replay_service(
            conn,
            store,
            schema="licensing",
            migrations_package=LICENSING.migrations_package,
            projections=LICENSING.projections,
            **kw,  # type: ignore[arg-type]
        )
    finally:
        await conn.close()


def sample(platform: Platform, name: str, **labels: str) -> float:
    value = platform.registry.get_sample_value(
        name, {"service": "licensing", "projection": PROJECTION, **labels}
    )
    return value or 0.0


async def test_events_are_applied_once_with_their_checkpoint(fresh, db) -> None:
    settings, store = fresh
    seqs = await publish_licenses(store, 30)
    platform = await start(settings)
    try:
        await caught_up(db, seqs[-1])
        assert await db.fetchval("SELECT count(*) FROM licenses") == 30
        assert await db.fetchval("SELECT count(*) FROM license_history") == 30
        assert sample(platform, "iotistic_projection_events_total", outcome="applied") == 30
        ok, detail = await platform.readiness()
        assert ok, detail
        entry = detail["services"]["licensing"]["projections"][PROJECTION]
        assert entry == {"state": "running", "attached": True, "checkpoint": seqs[-1], "lag": 0}
    finally:
        await platform.stop()
    report = await verify(settings, store, verify=True)
    assert report.differences == 0
    assert report.upto_seq == seqs[-1]


async def test_a_redelivered_event_changes_nothing(fresh, db) -> None:
    settings, store = fresh
    seqs = await publish_licenses(store, 20)
    platform = await start(settings)
    await caught_up(db, seqs[-1])
    await platform.stop()
    before = await db.fetch("SELECT * FROM licenses ORDER BY license_id")

    # A consumer that starts over (restored from an old backup, say) delivers everything again.
    js = store.js
    durable = f"licensing_{PROJECTION}"
    info = await js.consumer_info(store.stream, durable)
    await js.delete_consumer(store.stream, durable)
    config = info.config
    config.deliver_policy = api.DeliverPolicy.ALL
    config.opt_start_seq = None
    await js.add_consumer(store.stream, config)

    platform = await start(settings)
    try:
        await eventually(
            lambda: asyncio.sleep(
                0, sample(platform, "iotistic_projection_events_total", outcome="duplicate")
            ),
            lambda n: n == 20,
            what="20 duplicates recognised",
        )
        assert sample(platform, "iotistic_projection_events_total", outcome="applied") == 0
        assert await db.fetch("SELECT * FROM licenses ORDER BY license_id") == before
        assert await db.fetchval("SELECT count(*) FROM license_history") == 20
    finally:
        await platform.stop()
    assert (await verify(settings, store, verify=True)).differences == 0


def iotistic_bin() -> str:
    return str(Path(sys.executable).parent / "iotistic")


def service_env(settings: ServiceSettings, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("database_url", "nats_url", "events_stream", "events_subject_prefix"):
        env[name.upper()] = str(getattr(settings, name))
    env["NATS_CREDENTIALS_DIR"] = settings.nats_credentials_dir or ""
    env.update(
        HTTP_HOST="127.0.0.1",
        HTTP_PORT=str(free_port()),
        LOG_LEVEL="WARNING",
        LICENSE_KEYS_DIR=license_keys_dir(),
    )
    env.update(extra)
    return env


async def test_killed_between_events_and_restarted_ends_equal_to_a_clean_replay(
    fresh, db, tmp_path: Path
) -> None:
    settings, store = fresh
    env = service_env(settings, PROJECTION_BATCH_SIZE="5", LOG_LEVEL="INFO")
    log_file = tmp_path / "service.log"
    stop_publishing = asyncio.Event()

    async def keep_publishing() -> list[int]:
        seqs: list[int] = []
        while not stop_publishing.is_set():
            seqs += await publish_licenses(store, 5)
            await asyncio.sleep(0.005)
        return seqs

    def launch() -> subprocess.Popen[bytes]:
        with log_file.open("ab") as log:
            return subprocess.Popen(
                [iotistic_bin(), "run", "--target", "licensing"],
                env=env,
                stdout=log,
                stderr=log,
            )

    publisher = asyncio.create_task(keep_publishing())
    proc = launch()
    try:
        for _ in range(4):
            # Let it apply some events, then kill it mid-stream without a chance to clean up.
            before = await _checkpoint_or_zero(db)
            try:
                await eventually(
                    lambda: _checkpoint_or_zero(db),
                    lambda c, b=before: c > b + 10,
                    what="progress before the kill",
                )
            except AssertionError as exc:
                tail = log_file.read_text(errors="replace")[-3000:]
                activity = await db.fetch(
                    "SELECT pid, state, wait_event_type, wait_event, left(query, 80) AS q "
                    "FROM pg_stat_activity WHERE datname = current_database()"
                )
                info = await store.js.consumer_info(store.stream, "licensing_licenses")
                raise AssertionError(
                    f"{exc}\n--- service log ---\n{tail}\n--- activity ---\n"
                    + "\n".join(str(dict(r)) for r in activity)
                    + f"\n--- consumer ---\n{info}"
                ) from None
            await asyncio.sleep(random.uniform(0.0, 0.2))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc = launch()
        stop_publishing.set()
        seqs = await publisher
        try:
            await caught_up(db, seqs[-1])
        except AssertionError as exc:
            tail = log_file.read_text(errors="replace")[-4000:]
            raise AssertionError(f"{exc}\n--- service log ---\n{tail}") from None
    finally:
        stop_publishing.set()
        proc.terminate()
        proc.wait(timeout=20)
    total = len(seqs)
    assert total > 50
    assert await db.fetchval("SELECT count(*) FROM licenses") == total
    assert await db.fetchval("SELECT count(DISTINCT seq) FROM license_history") == total
    assert (await verify(settings, store, verify=True)).differences == 0


async def _has_checkpoint(db: asyncpg.Connection) -> bool:
    return bool(await db.fetchval("SELECT to_regclass('projection_checkpoints') IS NOT NULL"))


async def _checkpoint_or_zero(db: asyncpg.Connection) -> int:
    return await checkpoint(db) if await _has_checkpoint(db) else 0


async def test_verify_reports_rows_altered_by_hand_and_replay_repairs_them(fresh, db) -> None:
    settings, store = fresh
    seqs = await publish_licenses(store, 12)
    platform = await start(settings)
    try:
        await caught_up(db, seqs[-1])
        changed = await db.fetchval("SELECT license_id FROM licenses LIMIT 1")
        await db.execute("UPDATE licenses SET plan = 'enterprise' WHERE license_id = $1", changed)
        await db.execute("DELETE FROM license_history WHERE seq = $1", seqs[3])
        await db.execute(
            "INSERT INTO license_history (seq, customer_id, license_id, action, actor, at) "
            "VALUES (999999, 'c', 'l', 'issued', 'someone', now())"
        )
        report = await verify(settings, store, verify=True)
        by_table = {d.table: d for d in report.diffs}
        assert report.differences == 3
        [(live, rebuilt)] = by_table["licenses"].changed
        assert (live["plan"], rebuilt["plan"]) == ("enterprise", "starter")
        assert [r["seq"] for r in by_table["license_history"].only_rebuilt] == [seqs[3]]
        assert [r["seq"] for r in by_table["license_history"].only_live] == [999999]

        # A replay while the service runs puts the log's truth back, and the service goes on.
        repaired = await verify(settings, store)
        assert repaired.upto_seq == seqs[-1]
        more = await publish_licenses(store, 3)
        await caught_up(db, more[-1])
        assert (await verify(settings, store, verify=True)).differences == 0
        assert await db.fetchval("SELECT count(*) FROM licenses") == 15
    finally:
        await platform.stop()


async def test_verify_fails_and_names_a_projection_stalled_behind_the_head(fresh, db) -> None:
    """Issue 12: runners that died left their checkpoints behind the log, and verify, which
    compared only up to those checkpoints, found nothing wrong."""
    settings, store = fresh
    never_ran = await publish_licenses(store, 4)
    report = await verify(settings, store, verify=True, wait=0.2)
    check = licenses_check(report)
    assert (check.projection, check.checkpoint, check.head, check.lag) == (
        PROJECTION,
        0,
        never_ran[-1],
        4,
    )
    assert report.lagging() == [check]

    platform = await start(settings)
    await caught_up(db, never_ran[-1])
    await platform.stop()  # its runner is gone; the log goes on
    later = await publish_licenses(store, 7)
    report = await verify(settings, store, verify=True, wait=0.3)
    check = licenses_check(report)
    assert (check.checkpoint, check.head, check.lag, check.state) == (
        never_ran[-1],
        later[-1],
        7,
        "stalled",
    )
    assert report.differences == 0  # its rows are right as far as it got: compared there
    assert report.lagging(max_lag=6) == [check]
    assert report.lagging(max_lag=7) == []


async def test_verify_waits_for_a_running_projection_and_counts_only_its_own_events(
    fresh, db, nc: NatsClient
) -> None:
    settings, store = fresh
    seqs = await publish_licenses(store, 5)
    platform = await start(settings)
    try:
        await caught_up(db, seqs[-1])
        # Events this projection never reads leave its checkpoint behind the head, not behind.
        other = await publish_raw(nc, store, "DeploymentStarted", b"{}")
        report = await verify(settings, store, verify=True, wait=0.0)
        check = licenses_check(report)
        assert (check.checkpoint, check.head, check.lag) == (seqs[-1], other, 0)
        assert report.lagging() == []

        # Appended just before verify: it records the head and waits for the runner to get there.
        more = await publish_licenses(store, 20)
        report = await verify(settings, store, verify=True, wait=20.0)
        check = licenses_check(report)
        assert check.head == more[-1]
        assert check.checkpoint >= more[-1]
        assert (check.lag, check.state, report.differences) == (0, "at head", 0)
    finally:
        await platform.stop()


async def test_verify_on_a_busy_log_compares_both_sides_at_one_sequence(fresh, db) -> None:
    settings, store = fresh
    stop_publishing = asyncio.Event()

    async def keep_publishing() -> None:
        while not stop_publishing.is_set():
            await publish_licenses(store, 3)
            await asyncio.sleep(0.01)

    platform = await start(settings)
    publisher = asyncio.create_task(keep_publishing())
    try:
        await caught_up(db, 30)
        for _ in range(3):
            report = await verify(settings, store, verify=True, wait=20.0)
            check = licenses_check(report)
            assert report.differences == 0, report.diffs
            assert check.lag == 0 and check.checkpoint >= check.head
    finally:
        stop_publishing.set()
        await publisher
        await platform.stop()


async def test_replay_from_a_sequence_and_dry_run(fresh, db) -> None:
    settings, store = fresh
    seqs = await publish_licenses(store, 10)
    dry = await verify(settings, store, dry_run=True)
    assert (dry.events_applied, dry.upto_seq) == (10, seqs[-1])
    assert await db.fetchval("SELECT count(*) FROM licenses") == 0  # dry run changed nothing
    partial = await verify(settings, store, from_seq=seqs[6], dry_run=True)
    assert (partial.events_applied, partial.upto_seq) == (4, seqs[-1])
    full = await verify(settings, store)
    assert full.events_applied == 10
    assert await db.fetchval("SELECT count(*) FROM licenses") == 10
    assert await checkpoint(db) == seqs[-1]


async def test_a_replay_from_a_later_sequence_never_replaces_the_live_rows(fresh, db) -> None:
    settings, store = fresh
    seqs = await publish_licenses(store, 10)
    await verify(settings, store)
    before = await db.fetch("SELECT * FROM licenses ORDER BY license_id")
    assert len(before) == 10
    # Rebuilt from seqs[6] the model lacks the first six events: swapping it in would lose them.
    with pytest.raises(ReplayError, match="dry run or verify"):
        await verify(settings, store, from_seq=seqs[6])
    assert await db.fetch("SELECT * FROM licenses ORDER BY license_id") == before
    assert await checkpoint(db) == seqs[-1]


async def test_a_replay_whose_log_reader_stalls_still_rebuilds_every_event(
    fresh, db, nats_url: str
) -> None:
    settings, store = fresh
    seqs = await publish_licenses(store, 520)  # more than one batch of the log reader (500)
    async with TcpRelay(nats_url) as relay:
        nc = await connect_harness(relay.url, name="stalled replay")
        try:

            def progress(seq: int, end: int) -> None:
                if seq == seqs[499]:
                    relay.hold()  # the next batch is held up longer than a fetch waits

            asked = relay.watch_client(b"CONSUMER.INFO")
            replaying = asyncio.create_task(
                verify(settings, EventStore(nc.jetstream(), settings), progress=progress)
            )
            # The reader either gives up at the timeout (the bug) or asks the server how far
            # its consumer got; either way the network recovers then.
            await asyncio.wait(
                {replaying, asyncio.create_task(asked.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            relay.release()
            report = await replaying
        finally:
            await nc.close()
    assert (report.events_applied, report.upto_seq) == (520, seqs[-1])
    assert await db.fetchval("SELECT count(*) FROM licenses") == 520
    assert await checkpoint(db) == seqs[-1]


async def publish_raw(nc: NatsClient, store: EventStore, subject_type: str, data: bytes) -> int:
    ack = await nc.jetstream().publish(
        store.subject(subject_type, "bad"), data, stream=store.stream
    )
    return int(ack.seq)


async def test_a_malformed_event_is_parked_counted_and_waits_for_the_operator(
    fresh, db, nc: NatsClient
) -> None:
    settings, store = fresh
    [good] = await publish_licenses(store, 1)
    garbage = await publish_raw(nc, store, "LicenseIssued", b"\x00not json at all")
    await publish_licenses(store, 1)  # waits behind the parked event
    platform = await start(settings)
    try:
        # Both of licensing's consumers of LicenseIssued park it: the read model and the
        # reactor that tracks the current license.
        parked = await eventually(
            lambda: db.fetch("SELECT * FROM parked_events ORDER BY projection"),
            lambda rows: len(rows) == 2,
            what="the event parked by each consumer",
        )
        assert [(r["projection"], r["seq"], r["event_type"], r["resolved_at"]) for r in parked] == [
            ("issue_licenses", garbage, "LicenseIssued", None),
            (PROJECTION, garbage, "LicenseIssued", None),
        ]
        assert all("malformed" in r["error"] for r in parked)
        assert sample(platform, "iotistic_projection_parked_events_total") == 1
        ok, detail = await platform.readiness()
        entry = detail["services"]["licensing"]["projections"][PROJECTION]
        assert ok, detail  # the service keeps serving
        assert entry["state"] == "blocked"
        assert entry["blocked_at"] == garbage
        # Its lag is on /metrics too, also with events appended while it is stuck: the
        # parked event, the one after it, and one more.
        [later] = await publish_licenses(store, 1)
        _, detail = await platform.readiness()
        lag = detail["services"]["licensing"]["projections"][PROJECTION]["lag"]
        assert lag == 3 and sample(platform, "iotistic_projection_pending_events") == lag
        # The projection holds at the parked event: the later one waits for the decision.
        assert await checkpoint(db) == good
        assert await db.fetchval("SELECT count(*) FROM licenses") == 1

        await db.execute(
            "UPDATE parked_events SET decision = 'skip', decided_at = now() WHERE seq = $1",
            garbage,
        )
        await caught_up(db, later)
        assert await db.fetchval("SELECT count(*) FROM licenses") == 3
        await eventually(
            lambda: db.fetchval("SELECT bool_and(resolved_at IS NOT NULL) FROM parked_events"),
            what="both parked copies resolved",
        )
        ok, detail = await platform.readiness()
        assert detail["services"]["licensing"]["projections"][PROJECTION]["state"] == "running"
        assert sample(platform, "iotistic_projection_pending_events") == 0
    finally:
        await platform.stop()
    # The rebuild skips what the operator skipped, so live and replay agree.
    report = await verify(settings, store, verify=True)
    assert report.differences == 0
    assert report.skipped == [garbage]


async def test_an_event_with_a_bad_body_is_parked_and_can_be_retried(
    fresh, db, nc: NatsClient
) -> None:
    settings, store = fresh
    good = license_issued()
    envelope = new_envelope(good, customer_id=good.customer_id)
    body = msgspec.json.decode(msgspec.json.encode(envelope))
    del body["data"]["features"]
    bad = await publish_raw(nc, store, "LicenseIssued", msgspec.json.encode(body))
    platform = await start(settings)
    try:
        # Both of licensing's consumers of LicenseIssued park it; the retry is decided for both
        # (deciding before the second parked would leave that one waiting, undecided).
        await eventually(
            lambda: db.fetchval("SELECT count(*) FROM parked_events WHERE seq = $1", bad),
            lambda n: n == 2,
            what="parked by both projections",
        )
        await db.execute("UPDATE parked_events SET decision = 'retry' WHERE seq = $1", bad)
        # Retried, it fails again: parked again, attempts add up, still waiting.
        rows = await eventually(
            lambda: db.fetch("SELECT * FROM parked_events WHERE seq = $1", bad),
            lambda rs: (
                len(rs) == 2 and all(r["attempts"] >= 2 and r["decision"] is None for r in rs)
            ),
            what="parked again after retry",
        )
        assert all(r["resolved_at"] is None for r in rows)
        assert all("features" in r["error"] for r in rows)
        assert await checkpoint(db) == bad - 1
    finally:
        await platform.stop()


async def test_one_replica_consumes_and_a_standby_takes_over(fresh, db) -> None:
    settings, store = fresh
    first = await start(settings)
    second = await start(settings)
    try:
        states = await eventually(
            lambda: asyncio.sleep(
                0,
                sorted(
                    p.services["licensing"].runners[0].status.state.value for p in (first, second)
                ),
            ),
            lambda s: s == ["running", "standby"],
            what="one leader and one standby",
        )
        assert states == ["running", "standby"]
        leader, standby = (
            (first, second)
            if (first.services["licensing"].runners[0].status.state.value == "running")
            else (second, first)
        )
        seqs = await publish_licenses(store, 10)
        await caught_up(db, seqs[-1])
        await leader.stop()
        more = await publish_licenses(store, 10)
        await caught_up(db, more[-1])
        assert standby.services["licensing"].runners[0].status.state.value == "running"
        assert await db.fetchval("SELECT count(*) FROM license_history") == 20
    finally:
        await first.stop()
        await second.stop()


async def test_a_delivery_lost_in_a_reconnect_is_applied_not_taken_for_a_duplicate(
    fresh, db, nats_url: str
) -> None:
    settings, store = fresh
    [first] = await publish_licenses(store, 1)
    async with TcpRelay(nats_url) as relay:
        # A long ack wait: the lost delivery is not redelivered while the test runs, so only
        # noticing the gap in delivery brings it back.
        relayed = msgspec.structs.replace(
            settings, nats_url=relay.url, projection_ack_wait_seconds=300
        )
        platform = await start(relayed)
        try:
            await caught_up(db, first)
            # The connection drops just as the server delivers the next event to the projection;
            # the client reconnects and the consumer goes on with the events after it.
            relay.cut_at(f".{store.stream}.licensing_{PROJECTION}.".encode())
            [lost] = await publish_licenses(store, 1)
            await asyncio.wait_for(relay.cut.wait(), timeout=30)
            later = await publish_licenses(store, 3)
            await caught_up(db, later[-1])
            await eventually(
                lambda: db.fetchval("SELECT count(*) FROM license_history"),
                lambda n: n == 5,
                what="every event applied, the one lost in the reconnect too",
            )
            applied = await db.fetch("SELECT seq FROM license_history ORDER BY seq")
            assert [r["seq"] for r in applied] == [first, lost, *later]
        finally:
            await platform.stop()
    assert (await verify(settings, store, verify=True)).differences == 0


async def test_a_stream_created_again_stops_the_projection_until_it_is_rebuilt(
    fresh, db, nc: NatsClient
) -> None:
    settings, store = fresh
    seqs = await publish_licenses(store, 5)
    platform = await start(settings)
    try:
        await caught_up(db, seqs[-1])
    finally:
        await platform.stop()
    # The stream is lost and made again: its sequences start at 1 again, below the checkpoint
    # at first, then past it; neither may be taken for events already applied.
    await nc.jetstream().delete_stream(settings.events_stream)
    await store.ensure_stream()
    for count in (2, 6):
        await publish_licenses(store, count)
        platform = await start(settings)
        try:
            entry = await eventually(
                platform.readiness,
                lambda r: (
                    r[1]["services"]["licensing"]["projections"][PROJECTION]["state"] == "blocked"
                ),
                what="the projection stopped",
            )
            detail = entry[1]["services"]["licensing"]["projections"][PROJECTION]
            assert "created again" in detail["error"]
            assert await checkpoint(db) == seqs[-1]
            assert await db.fetchval("SELECT count(*) FROM licenses") == 5
        finally:
            await platform.stop()
    # Rebuilt from the new stream, the projection reads on from it.
    report = await verify(settings, store)
    assert report.upto_seq == 8
    assert await db.fetchval("SELECT count(*) FROM licenses") == 8
    [later] = await publish_licenses(store, 1)
    platform = await start(settings)
    try:
        await caught_up(db, later)
        assert await db.fetchval("SELECT count(*) FROM licenses") == 9
    finally:
        await platform.stop()


async def test_a_replica_whose_projection_was_taken_over_writes_nothing_more(
    fresh, db, caplog: pytest.LogCaptureFixture
) -> None:
    settings, store = fresh
    seqs = await publish_licenses(store, 3)
    platform = await start(settings)
    try:
        await caught_up(db, seqs[-1])
        epoch = await db.fetchval(
            "SELECT epoch FROM projection_checkpoints WHERE projection = $1", PROJECTION
        )
        # Another replica takes the projection, as when this one's lock session was lost
        # without it noticing yet: it counts the epoch up.
        await db.execute(
            "UPDATE projection_checkpoints SET epoch = epoch + 1 WHERE projection = $1",
            PROJECTION,
        )
        more = await publish_licenses(store, 3)
        # This replica's next write is refused; it stands by, and as no one else holds the
        # lock here, it leads again under an epoch of its own and applies them once.
        await caught_up(db, more[-1])
        assert "taken by another replica" in caplog.text
        assert await db.fetchval("SELECT count(*) FROM licenses") == 6
        assert (
            await db.fetchval(
                "SELECT epoch FROM projection_checkpoints WHERE projection = $1", PROJECTION
            )
            == epoch + 2
        )
    finally:
        await platform.stop()
    report = await verify(settings, store, verify=True)
    assert report.differences == 0
