"""The operator's commands against a real log and database: events, replay, parked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import msgspec
import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import api

from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.servers.nats import EmbeddedNats
from services.cli.main import server_error_line
from services.licensing.app import LICENSING
from support import eventually, fill, license_issued, make_platform

IOTISTIC = str(Path(sys.executable).parent / "iotistic")


def cli(
    settings: ServiceSettings, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "NATS_URL": settings.nats_url,
        "NATS_CREDENTIALS_DIR": settings.nats_credentials_dir or "",
        "EVENTS_STREAM": settings.events_stream,
        "EVENTS_SUBJECT_PREFIX": settings.events_subject_prefix,
        "IOTISTIC_DATA_DIR": "/nonexistent",
        "COLUMNS": "200",
    }
    result = subprocess.run(
        [IOTISTIC, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"iotistic {' '.join(args)} failed:\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
async def log_with_events(
    settings: ServiceSettings, store: EventStore, nc: NatsClient
) -> dict[str, int]:
    """Eight licenses and one malformed message, projected by a licensing service that ran (its
    two consumers of LicenseIssued, the licenses and the reactor that tracks the current one,
    each park the malformed one)."""
    seqs = []
    for _ in range(8):
        event = license_issued()
        seqs.append((await store.publish(event, customer_id=event.customer_id)).seq)
    bad = await nc.jetstream().publish(
        store.subject("LicenseIssued", "broken"), b"{not json", stream=store.stream
    )
    platform = make_platform(settings, [LICENSING])
    await platform.start()
    await platform.wait_started()
    conn = await asyncpg.connect(settings.database_url)
    try:
        await eventually(
            lambda: conn.fetchval("SELECT count(*) FROM licensing.parked_events"),
            lambda n: n == 2,
            what="the malformed message parked",
        )
    finally:
        await conn.close()
        await platform.stop()
    return {"first": seqs[0], "last": seqs[-1], "bad": int(bad.seq)}


async def test_events_stats_counts_per_type(settings, log_with_events) -> None:
    stats = json.loads(cli(settings, "events", "stats", "--json").stdout)
    assert stats["by_type"] == {"LicenseIssued": 9}
    assert stats["last_seq"] == log_with_events["bad"]


async def test_events_export_writes_json_lines_with_malformed_ones_marked(
    settings, log_with_events, tmp_path: Path
) -> None:
    out = tmp_path / "events.jsonl"
    cli(settings, "events", "export", "--from-seq", str(log_with_events["first"]), "-o", str(out))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 9
    assert [e["envelope"]["type"] for e in lines[:8]] == ["LicenseIssued"] * 8
    assert lines[0]["envelope"]["data"]["plan"] == "starter"
    assert lines[8]["seq"] == log_with_events["bad"]
    assert "malformed" in lines[8]
    ranged = cli(
        settings,
        "events",
        "export",
        "--from-seq",
        str(log_with_events["first"] + 2),
        "--to-seq",
        str(log_with_events["first"] + 4),
    ).stdout.splitlines()
    assert [json.loads(line)["seq"] for line in ranged] == [
        log_with_events["first"] + i for i in (2, 3, 4)
    ]


async def test_events_tail_follows_new_events(settings, store: EventStore, log_with_events) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "NATS_URL": settings.nats_url,
        "NATS_CREDENTIALS_DIR": settings.nats_credentials_dir or "",
        "EVENTS_STREAM": settings.events_stream,
        "EVENTS_SUBJECT_PREFIX": settings.events_subject_prefix,
    }
    proc = subprocess.Popen(
        [IOTISTIC, "events", "tail", "--json", "--from-seq", str(log_with_events["last"])],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first["seq"] == log_with_events["last"]
        event = license_issued()
        appended = await store.publish(event, customer_id=event.customer_id)
        seen = [json.loads(proc.stdout.readline()) for _ in range(2)]
        assert seen[-1]["seq"] == appended.seq
        assert seen[-1]["envelope"]["customer_id"] == event.customer_id
    finally:
        proc.terminate()
        proc.wait(timeout=20)


async def test_parked_list_and_skip_then_replay_verify(
    settings, store: EventStore, log_with_events
) -> None:
    listed = cli(settings, "parked", "list").stdout
    assert "licenses" in listed and str(log_with_events["bad"]) in listed
    skipped = cli(settings, "parked", "skip", "licensing", "licenses", str(log_with_events["bad"]))
    assert "skip" in skipped.stdout
    again = cli(settings, "parked", "skip", "licensing", "licenses", "999999", check=False)
    assert again.returncode == 1
    cli(settings, "parked", "skip", "licensing", "issue_licenses", str(log_with_events["bad"]))

    # Let the projection act on the decision and catch up to the head (the tail test appends
    # past the skipped event), then compare with a clean replay.
    head = await store.last_seq()
    platform = make_platform(settings, [LICENSING])
    await platform.start()
    await platform.wait_started()
    conn = await asyncpg.connect(settings.database_url)
    try:
        await eventually(
            lambda: licenses_checkpoint(conn),
            lambda seq: seq >= max(head, log_with_events["bad"]),
            what="the projection at the head, past the skipped event",
        )
        await platform.stop()
        clean = cli(settings, "replay", "licensing", "--verify")
        assert "no differences" in clean.stdout

        await conn.execute(
            "UPDATE licensing.licenses SET plan = 'enterprise' "
            "WHERE license_id = (SELECT min(license_id) FROM licensing.licenses)"
        )
        dirty = cli(settings, "replay", "licensing", "--verify", check=False)
        assert dirty.returncode == 1
        assert "row differs" in dirty.stdout
        assert "plan: live='enterprise' replay='starter'" in dirty.stdout

        cli(settings, "replay", "licensing")
        assert "no differences" in cli(settings, "replay", "licensing", "--verify").stdout
    finally:
        await conn.close()
        await platform.stop()


async def test_replay_from_a_later_seq_is_refused_without_dry_run_or_verify(
    settings, log_with_events
) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        before = await conn.fetch("SELECT * FROM licensing.licenses ORDER BY license_id")
        assert len(before) >= 8
        later = str(log_with_events["first"] + 2)
        refused = cli(settings, "replay", "licensing", "--from-seq", later, check=False)
        assert refused.returncode == 1
        assert "replay failed" in refused.stderr
        assert "dry run or verify" in refused.stderr
        assert "Traceback" not in refused.stderr
        # A rebuild missing the events before --from-seq never replaces the live rows.
        assert await conn.fetch("SELECT * FROM licensing.licenses ORDER BY license_id") == before
    finally:
        await conn.close()


async def test_replay_verify_fails_on_a_projection_behind_the_head_and_names_its_lag(
    settings, store: EventStore, log_with_events
) -> None:
    """No runner consumes meanwhile (as after a crash that left it dead): the events appended
    after its checkpoint are its lag, and verify must say so and fail, not report no difference."""
    # Past the malformed event, in case the test that skips it did not run first.
    cli(
        settings,
        "parked",
        "skip",
        "licensing",
        "licenses",
        str(log_with_events["bad"]),
        check=False,
    )
    platform = make_platform(settings, [LICENSING])
    await platform.start()
    await platform.wait_started()
    conn = await asyncpg.connect(settings.database_url)
    try:
        # At the head, whatever the tests before appended, so the three below are its whole lag.
        at_start = await store.last_seq()
        checkpoint = await eventually(
            lambda: licenses_checkpoint(conn),
            lambda seq: seq >= max(at_start, log_with_events["bad"]),
            what="the projection at the head, past the malformed event",
        )
        await platform.stop()
        for _ in range(3):
            event = license_issued()
            head = (await store.publish(event, customer_id=event.customer_id)).seq
        behind = cli(settings, "replay", "licensing", "--verify", "--wait", "0.2", check=False)
        assert behind.returncode == 1, behind.stdout + behind.stderr
        assert f"head of the log: seq {head}" in behind.stdout
        assert f"checkpoint {checkpoint}, head {head}, lag 3 (stalled)" in behind.stdout
        assert "licenses is 3 event(s) behind the head" in behind.stdout
        assert "no differences:" not in behind.stdout
    finally:
        await conn.close()
        await platform.stop()

    as_json = cli(settings, "replay", "licensing", "--verify", "--wait", "0", "--json", check=False)
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    [projection] = [p for p in report["projections"] if p["projection"] == "licenses"]
    # Licensing's other read model (account_access) reads none of these events: at its head.
    assert all(p["lag"] == 0 for p in report["projections"] if p is not projection)
    assert (report["ok"], report["head"], report["max_lag"]) == (False, head, 0)
    assert (projection["projection"], projection["head"], projection["lag"]) == (
        "licenses",
        head,
        3,
    )
    assert (projection["checkpoint"], projection["state"]) == (checkpoint, "stalled")

    tolerated = cli(settings, "replay", "licensing", "--verify", "--wait", "0", "--max-lag", "3")
    assert "lag 3" in tolerated.stdout
    refused = cli(settings, "replay", "licensing", "--max-lag", "3", check=False)
    assert refused.returncode == 2 and "with --verify only" in refused.stderr

    # Once a runner has applied them, the same check passes.
    platform = make_platform(settings, [LICENSING])
    await platform.start()
    await platform.wait_started()
    conn = await asyncpg.connect(settings.database_url)
    try:
        await eventually(
            lambda: licenses_checkpoint(conn),
            lambda seq: seq >= head,
            what="the projection at the head",
        )
        # (cli() blocks this loop, and with it the runner: it must have caught up before.)
        caught_up = cli(settings, "replay", "licensing", "--verify", "--json")
    finally:
        await conn.close()
        await platform.stop()
    [projection] = [
        p for p in json.loads(caught_up.stdout)["projections"] if p["projection"] == "licenses"
    ]
    assert (projection["lag"], projection["state"], projection["differences"]) == (0, "at head", 0)
    assert projection["checkpoint"] >= head


async def licenses_checkpoint(conn: asyncpg.Connection) -> int:
    value = await conn.fetchval(
        "SELECT last_seq FROM licensing.projection_checkpoints WHERE projection = 'licenses'"
    )
    return int(value or 0)


def test_a_tool_with_nothing_to_connect_to_says_so_and_touches_no_default_server(
    tmp_path: Path,
) -> None:
    """Without NATS_URL and no running `iotistic up` in the data folder, a tool must not fall
    back to 127.0.0.1:4222 and :5432: those are the machine's own servers, not ours."""
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL")}
    env["COLUMNS"] = "200"
    for command in (["events", "stats"], ["replay", "licensing", "--verify"], ["parked", "list"]):
        result = subprocess.run(
            [IOTISTIC, "--data-dir", str(tmp_path), *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, (command, result.stderr)
        assert "nothing to connect to" in result.stderr
        assert "Traceback" not in result.stderr


def test_a_tool_reading_a_log_without_its_stream_does_not_make_one(settings) -> None:
    """Only `events init` makes the stream; a tool that reads says it is not there."""
    missing = msgspec.structs.replace(settings, events_stream="NEVER_MADE")
    result = cli(missing, "events", "stats", check=False)
    assert result.returncode == 2
    assert "NEVER_MADE does not exist" in result.stderr
    assert "iotistic events init" in result.stderr


def test_a_refused_operator_password_is_named_as_such(settings, tmp_path: Path) -> None:
    folder = tmp_path / "credentials"
    folder.mkdir(mode=0o700)
    (folder / "operator").write_text("not-the-password")
    wrong = msgspec.structs.replace(settings, nats_credentials_dir=str(folder))
    result = cli(wrong, "events", "stats", check=False)
    assert result.returncode == 1
    assert "refused the credentials of operator" in result.stderr
    assert "Traceback" not in result.stderr


async def test_events_stats_reads_a_log_whose_server_disk_is_full(
    full_disk: Path, settings: ServiceSettings
) -> None:
    """Seen under faults: stats failed with "no space left on device". It asks only for stream
    info (no consumer, nothing written), so it must answer on a full disk; a command that needs
    a consumer gets one line that names the full disk."""
    with EmbeddedNats(full_disk / "nats") as server:
        env = {
            **{k: v for k, v in os.environ.items() if k != "NATS_CREDENTIALS_DIR"},
            "NATS_URL": server.url,
            "EVENTS_STREAM": settings.events_stream,
            "EVENTS_SUBJECT_PREFIX": settings.events_subject_prefix,
            "IOTISTIC_DATA_DIR": "/nonexistent",
        }
        run = [IOTISTIC, "events"]
        subprocess.run([*run, "init"], env=env, capture_output=True, timeout=60, check=True)
        nc = await nats.connect(server.url)
        try:
            store = EventStore(nc.jetstream(), settings)
            for _ in range(5):
                event = license_issued()
                await store.publish(event, customer_id=event.customer_id)
            fill(full_disk)
            stats = subprocess.run(
                [*run, "stats", "--json"], env=env, capture_output=True, text=True, timeout=60
            )
            assert stats.returncode == 0, stats.stderr
            assert json.loads(stats.stdout)["by_type"] == {"LicenseIssued": 5}

            # A consumer kept on disk cannot be made now. The server tells the client only
            # "error creating store for consumer" (the ENOSPC is in its log).
            with pytest.raises(nats.js.errors.APIError) as refused:
                await nc.jetstream().add_consumer(
                    store.stream, api.ConsumerConfig(durable_name="needs_disk")
                )
            line = server_error_line(refused.value)
            assert line.startswith("the NATS server has no room to store")
            assert "\n" not in line
        finally:
            await nc.close()
