"""The exit guarantee on real instances: one customer's everything exported as one archive
(manifest, checksums, readings per device and day in CSV and Parquet, rollups, rules, history,
their own events from the control plane's log), imported into a new instance, and exported
again: the same row counts and the same checksums (device ids aside, which an import renews).
Damaged, forged and foreign archives are refused naming the file, before anything is written.
Everything real: the control plane, the local backend's instance processes, Postgres, NATS
(with the services' own bus permissions) and Mosquitto.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pyarrow.parquet as pq
import pytest
from export_steps import manifest_of, members, retar, seed_readings, sha256
from test_instance import (  # noqa: F401 - client is a fixture
    Customer,
    client,
    customer,
    device_client,
    instance_database,
    reading,
    register,
)

from contracts.credentials import instance_usage_token
from libs.servers.mosquitto import EmbeddedMosquitto
from services.instance.alerts.presets import install_presets
from services.instance.integrations.positions import (
    integrations_in_force,
    new_events,
    new_readings,
)
from services.instance.integrations.store import NewIntegration, create_integration
from support import eventually

pytestmark = pytest.mark.slow

DAYS, PER_DAY = 3, 288


@pytest.fixture(scope="module")
async def olga(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "olga@example.com")
    yield found
    await found.api.aclose()


@pytest.fixture(scope="module")
async def pavel(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "pavel@example.com")
    yield found
    await found.api.aclose()


@pytest.fixture(scope="module")
async def quinn(client) -> AsyncIterator[Customer]:  # noqa: F811
    found = await customer(client, "quinn@example.com")
    yield found
    await found.api.aclose()


INTEGRATION_SECRET: dict[str, str] = {}


async def _rows(conn: asyncpg.Connection, query: str) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(query)]


@pytest.fixture(scope="module")
async def exported(olga: Customer, postgres_server_url: str) -> bytes:
    """Olga's instance with two devices, three days of readings (their sensors' calibration
    followed), a rule with history, the default rules less one she deleted, quota notices and
    refusals, an integration; her export."""
    ids = [(await register(olga, name))["device_id"] for name in ("kitchen", "cellar")]
    defaults = (await olga.api.get("/api/alerts/rules")).json()["rules"]
    mould = next(r for r in defaults if r["preset"] == "mould_risk")
    deleted = await olga.api.delete(f"/api/alerts/rules/{mould['rule_id']}")
    assert deleted.status_code == 204, deleted.text
    rule = await olga.api.post(
        "/api/alerts/rules",
        json={"metric": "temperature", "operator": ">", "threshold": 25, "devices": ids},
    )
    assert rule.status_code == 201, rule.text
    # Muted: nothing fires while the test compares (its history is written below).
    muted = await olga.api.patch(
        f"/api/alerts/rules/{rule.json()['rule_id']}", json={"muted": True}
    )
    assert muted.status_code == 200, muted.text
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    async with instance_database(postgres_server_url, olga) as conn:
        await seed_readings(conn, ids, DAYS, PER_DAY, start - timedelta(days=DAYS))
        await conn.execute(
            "INSERT INTO alert_history (rule_id, device_id, event, at, value, message) "
            "VALUES ($1, $2, 'firing', now(), 26.5, 'temperature 26.5 > 25')",
            rule.json()["rule_id"],
            ids[0],
        )
        await conn.execute(
            "INSERT INTO quota_notices (at, meter, period, level, used, quota, reported_at) "
            "VALUES (now() - interval '2 days', 'mqtt_messages', '2026-01-01', 80, 80, 100, "
            "now()), (now(), 'devices', 'from 2026-01-02', 80, 4, 5, NULL)"
        )
        await conn.execute(
            "INSERT INTO quota_limited (minute, meter, device_id, quota, what, count, first_at, "
            "last_at) VALUES (date_trunc('minute', now()), 'mqtt_messages', $1, 100, "
            "'readings', 7, now(), now()), "
            "(date_trunc('minute', now()), 'devices', NULL, 5, 'a device', 1, now(), now())",
            ids[1],
        )
        made = await create_integration(
            conn,
            NewIntegration(
                name="warehouse", url="https://hooks.example.com/iot", kinds=["readings"]
            ),
            datetime.now(UTC),
        )
        INTEGRATION_SECRET[made["integration_id"]] = made["secret"]
    answer = await olga.api.get("/api/export", timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/x-tar"
    return answer.content


def test_the_archive_holds_everything_with_its_checksums(exported: bytes, olga: Customer) -> None:
    parts = members(exported)
    names = list(parts)
    assert names[0] == "iotistic-export.json" and names[-1] == "manifest.json"
    manifest = json.loads(parts["manifest.json"])
    assert manifest["format"] == "iotistic-export" and manifest["version"] == 1
    assert manifest["customer_id"] == olga.id
    files = {f["name"]: f for f in manifest["files"]}
    assert set(files) == set(names[1:-1])
    for name, entry in files.items():
        assert entry["sha256"] == sha256(parts[name]), name
        assert entry["bytes"] == len(parts[name]), name
    counts = manifest["counts"]
    # Her rule and the four default ones (the one she deleted too, as deleted).
    assert counts["devices"] == 2 and counts["alert_rules"] == 5 and counts["alert_history"] == 1
    assert counts["alert_presets"] == 4 and counts["integrations"] == 1
    assert counts["quota_notices"] == 2 and counts["quota_limited"] == 2
    assert counts["calibration"] == 2 and counts["calibration_runs"] > 2
    assert counts["calibration_changes"] > counts["calibration_runs"]
    assert counts["readings"] == 2 * DAYS * PER_DAY
    csvs = [f for f in files.values() if f["kind"] == "readings-csv"]
    parquets = [f for f in files.values() if f["kind"] == "readings-parquet"]
    assert len(csvs) == len(parquets) == 2 * DAYS  # one per device and day, in both formats
    assert sum(f["rows"] for f in csvs) == counts["readings"]
    # The Parquet file holds the CSV's rows, with the columns' own types.
    first = csvs[0]
    table = pq.read_table(io.BytesIO(parts[first["name"].replace(".csv", ".parquet")]))
    assert table.num_rows == first["rows"] == parts[first["name"]].count(b"\n") - 1
    assert str(table.schema.field("temperature").type) == "float"
    assert str(table.schema.field("ts").type) == "timestamp[us, tz=UTC]"
    assert manifest["time_range"]["from"] < manifest["time_range"]["to"]
    # Nothing secret: no webhook secrets, no key hashes, no broker passwords.
    assert b"webhook_secret" not in exported and b"key_hash" not in exported
    assert b"password" not in exported
    # Nor the integration's signing secret: its configuration only.
    # (Other modules reuse the `exported` fixture, each adding its own integration here.)
    made = list(INTEGRATION_SECRET.values())
    assert made and all(secret.encode() not in exported for secret in made)
    [integration] = [json.loads(line) for line in parts["integrations.jsonl"].splitlines()]
    assert "secret" not in integration
    assert (integration["name"], integration["kinds"]) == ("warehouse", ["readings"])
    # Her own events from the log, as stored: her signup first, nobody else's.
    assert manifest["events"] == {"included": True}
    events = [json.loads(line) for line in parts["events.jsonl"].splitlines()]
    assert events[0]["event"]["type"] == "CustomerSignedUp"
    assert {e["event"]["customer_id"] for e in events} == {olga.id}
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert counts["events"] == len(events) >= 3  # signed up, trial, license at least


async def test_another_customer_cannot_export_or_import_here(olga: Customer, pavel) -> None:
    async with httpx.AsyncClient(base_url=str(olga.api.base_url), headers=pavel.auth) as other:
        assert (await other.get("/api/export")).status_code == 404
        assert (await other.post("/api/import", content=b"x")).status_code == 404
    async with httpx.AsyncClient(base_url=str(olga.api.base_url)) as nobody:
        assert (await nobody.get("/api/export")).status_code == 401


async def test_a_round_trip_restores_the_same_counts_and_checksums(
    exported: bytes,
    olga: Customer,
    pavel: Customer,
    broker: EmbeddedMosquitto,
    postgres_server_url: str,
) -> None:
    # A rule the new instance had before (as one made on by default): the archive's replace it.
    before_import = await pavel.api.post(
        "/api/alerts/rules", json={"metric": "humidity", "operator": ">", "threshold": 70}
    )
    assert before_import.status_code == 201, before_import.text
    imported = await pavel.api.post(
        "/api/import",
        content=exported,
        headers={"Content-Type": "application/x-tar"},
        timeout=120,
    )
    assert imported.status_code == 201, imported.text
    answer = imported.json()
    before = manifest_of(exported)
    assert answer["first_time"] is True
    assert answer["counts"]["readings"] == before["counts"]["readings"]
    assert answer["counts"]["rollups"] == before["counts"]["rollups"]
    renamed = answer["device_ids"]
    # Olga's rules in place of Pavel's (his own and his default ones): the default rule she
    # deleted stays deleted, the others are not doubled.
    rules = (await pavel.api.get("/api/alerts/rules")).json()["rules"]
    assert sorted((r["preset"] or r["metric"], r["muted"]) for r in rules) == [
        ("co2_high", False),
        ("offline", False),
        ("stale_sensor", False),
        ("temperature", True),
    ]
    mine = next(r for r in rules if r["metric"] == "temperature")
    assert sorted(mine["devices"]) == sorted(renamed.values())
    await _restored_as_olga_had_them(postgres_server_url, olga, pavel, renamed, answer)
    again = await pavel.api.get("/api/export", timeout=120)
    after = manifest_of(again.content)
    for key in ("devices", "readings", "rollups", "alert_rules", "alert_history", *OWNED):
        assert after["counts"][key] == before["counts"][key], key
    assert after["time_range"] == before["time_range"]

    def renewed(data: bytes) -> bytes:
        for old, new in renamed.items():
            data = data.replace(old.encode(), new.encode())
        return data

    old_parts, new_parts = members(exported), members(again.content)
    by_place = {(f["kind"], f.get("device_id"), f.get("day")): f for f in after["files"]}
    compared = 0
    for entry in before["files"]:
        if entry["kind"] not in {"readings-csv", "rollups-csv"}:
            continue
        twin = by_place[(entry["kind"], renamed[entry["device_id"]], entry.get("day"))]
        assert twin["rows"] == entry["rows"]
        # The same bytes once the device ids are the new ones: the same checksum.
        assert twin["sha256"] == sha256(renewed(old_parts[entry["name"]])), entry["name"]
        assert new_parts[twin["name"]] == renewed(old_parts[entry["name"]])
        compared += 1
    assert compared == 2 * DAYS + 2
    # A device's new credentials work: its reading arrives in the new instance.
    device = answer["devices"][0]
    mqtt = {"mqtt": {**device, "client_id": device["client_id"]}}
    async with device_client(broker, mqtt) as publisher:
        await publisher.publish(device["topics"]["readings"], reading(temperature=19.5), qos=1)
    await eventually(
        lambda: pavel.api.get(f"/api/devices/{device['device_id']}"),
        lambda r: (r.json()["latest"] or {}).get("temperature") == 19.5,
        what="a reading with the new credentials",
    )
    # The integration is sent that reading, and nothing of what was imported.
    async with instance_database(postgres_server_url, pavel) as conn:
        [integration] = await integrations_in_force(conn)
        sent = await eventually(
            lambda: new_readings(conn, integration),
            lambda rows: len(rows) > 0,
            what="the new reading for the integration",
        )
        assert [r["device_id"] for r in sent] == [device["device_id"]]
        assert sent[0]["temperature"] == 19.5


OWNED = (
    "alert_presets",
    "calibration",
    "calibration_runs",
    "calibration_changes",
    "quota_notices",
    "quota_limited",
    "integrations",
)


async def _restored_as_olga_had_them(
    server_url: str,
    olga: Customer,
    pavel: Customer,
    renamed: dict[str, str],
    answer: dict[str, Any],
) -> None:
    """Presets, calibration, quota notices and refusals, integrations: Pavel's as Olga's, under
    the devices' new ids; the integration with a new secret, given once, sent nothing old."""
    queries = {
        "alert_presets": "SELECT preset, rule_id FROM alert_presets ORDER BY preset",
        "calibration": "SELECT * FROM calibration ORDER BY device_id",
        "calibration_runs": "SELECT * FROM calibration_runs ORDER BY device_id, started_at",
        "calibration_changes": "SELECT device_id, at, from_state, to_state, accuracy, dropped "
        "FROM calibration_changes ORDER BY id",
        "quota_notices": "SELECT at, meter, period, level, used, quota FROM quota_notices "
        "ORDER BY id",
        "quota_limited": "SELECT minute, meter, device_id, quota, what, count, first_at, last_at "
        "FROM quota_limited ORDER BY id",
        "integrations": "SELECT integration_id, name, url, kinds, created_at, deleted_at, secret "
        "FROM integrations ORDER BY created_at",
    }
    async with instance_database(server_url, olga) as conn:
        theirs = {table: await _rows(conn, query) for table, query in queries.items()}
    async with instance_database(server_url, pavel) as conn:
        his = {table: await _rows(conn, query) for table, query in queries.items()}
        assert await install_presets(conn) == []  # at his next start: none installed again
        assert all(r["reported_at"] for r in await conn.fetch("SELECT * FROM quota_notices"))
        [integration] = await integrations_in_force(conn)
        assert await new_readings(conn, integration) == []
        assert await new_events(conn, integration) == []
    for table in ("calibration", "calibration_runs", "calibration_changes", "quota_limited"):
        for row in theirs[table]:
            row["device_id"] = renamed.get(row["device_id"], row["device_id"])
    for rows in (*theirs.values(), *his.values()):  # the new ids sort otherwise
        rows.sort(key=lambda r: (r.get("device_id") or "", str(r.get("started_at"))))
    [olgas] = theirs.pop("integrations")
    [pavels] = his.pop("integrations")
    assert answer["integration_secrets"] == {olgas["integration_id"]: pavels["secret"]}
    assert pavels.pop("secret") != olgas.pop("secret") and pavels == olgas
    assert theirs["calibration"] and theirs["quota_limited"]
    assert his == theirs


async def test_a_retried_import_finds_the_first_and_a_used_instance_refuses(
    exported: bytes, pavel: Customer
) -> None:
    retried = await pavel.api.post("/api/import", content=exported, timeout=120)
    assert retried.status_code == 201, retried.text
    assert retried.json()["first_time"] is False and "devices" not in retried.json()
    listed = (await pavel.api.get("/api/devices")).json()["devices"]
    assert len(listed) == 2  # not imported twice
    # The passwords were in the first answer only; a device gets new ones on asking.
    device_id = listed[0]["device_id"]
    renewed = await pavel.api.post(f"/api/devices/{device_id}/credentials")
    assert renewed.status_code == 201, renewed.text
    assert renewed.json()["password"] and renewed.json()["client_id"] == device_id
    assert (await pavel.api.post("/api/devices/nosuchdevice/credentials")).status_code == 404
    parts = members(exported)
    manifest = json.loads(parts["manifest.json"])
    manifest["exported_at"] = "another time"  # another archive, the same data
    parts["manifest.json"] = json.dumps(manifest).encode()
    refused = await pavel.api.post("/api/import", content=retar(parts), timeout=120)
    assert refused.status_code == 409, refused.text
    assert "holds data already" in refused.json()["error"]["message"]


@pytest.mark.parametrize(
    ("damage", "file"),
    [
        ("flip", "readings-csv"),
        ("drop", "readings-parquet"),
        ("format", "iotistic-export.json"),
        ("truncate", "manifest.json"),
        ("extra", "../escape"),
    ],
)
async def test_a_damaged_or_foreign_archive_is_refused_naming_the_file(
    exported: bytes, quinn: Customer, damage: str, file: str
) -> None:
    parts = members(exported)
    manifest = json.loads(parts["manifest.json"])
    target = next((f["name"] for f in manifest["files"] if f["kind"] == file), file)
    if damage == "flip":
        body = bytearray(parts[target])
        body[-3] ^= 1
        parts[target] = bytes(body)
        archive = retar(parts)
    elif damage == "drop":
        del parts[target]
        archive = retar(parts)
    elif damage == "format":
        parts[target] = json.dumps({"format": "iotistic-export", "version": 99}).encode()
        archive = retar(parts)
    elif damage == "truncate":
        archive = exported[: len(exported) // 2]
    else:
        last = parts.pop("manifest.json")
        archive = retar({**parts, target: b"x", "manifest.json": last})
    refused = await quinn.api.post("/api/import", content=archive, timeout=120)
    assert refused.status_code == 400, refused.text
    fields = refused.json()["error"]["fields"]
    assert fields[0]["field"] in {target, "archive", "manifest.json"}, fields
    if damage in {"flip", "drop", "format"}:
        assert fields[0]["field"] == target
    # Nothing was written: the instance is as new.
    assert (await quinn.api.get("/api/devices")).json()["devices"] == []


def _forged(exported: bytes, name: str, rows: list[dict[str, Any]]) -> bytes:
    """The archive with ``name`` holding ``rows``, its manifest entry made to match."""
    parts = members(exported)
    body = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    manifest = json.loads(parts.pop("manifest.json"))
    for entry in manifest["files"]:
        if entry["name"] == name:
            entry |= {"sha256": sha256(body), "bytes": len(body), "rows": len(rows)}
    parts[name] = body
    return retar({**parts, "manifest.json": json.dumps(manifest).encode()})


def _first(exported: bytes, name: str) -> dict[str, Any]:
    return dict(json.loads(members(exported)[name].splitlines()[0]))


@pytest.mark.parametrize(
    ("file", "forge", "reason"),
    [
        ("integrations.jsonl", lambda r: [r | {"kinds": ["readings", "nope"]}], "kinds"),
        ("integrations.jsonl", lambda r: [r, r | {"integration_id": "other"}], "named"),
        (
            "integrations.jsonl",
            lambda r: [r | {"integration_id": f"i{n}", "name": f"n{n}"} for n in range(21)],
            "more than 20",
        ),
        ("calibration.jsonl", lambda r: [r | {"device_id": ["a", "b"]}], "names a device"),
        ("quota_limited.jsonl", lambda r: [r | {"device_id": "elsewhere"}], "names a device"),
        ("calibration_runs.jsonl", lambda r: [r | {"started_at": "not a time"}], "restored"),
    ],
)
async def test_a_forged_part_is_refused_naming_its_file(
    exported: bytes, quinn: Customer, file: str, forge: Any, reason: str
) -> None:
    archive = _forged(exported, file, forge(_first(exported, file)))
    refused = await quinn.api.post("/api/import", content=archive, timeout=120)
    assert refused.status_code == 400, refused.text
    [field] = refused.json()["error"]["fields"]
    assert field["field"] == file and reason in field["reason"], field
    assert (await quinn.api.get("/api/devices")).json()["devices"] == []


async def test_an_instance_with_an_integration_is_not_new(
    exported: bytes,
    client,  # noqa: F811
    postgres_server_url: str,
) -> None:
    sam = await customer(client, "sam@example.com")
    try:
        async with instance_database(postgres_server_url, sam) as conn:
            new = NewIntegration(name="mine", url="https://hooks.example.com/x", kinds=["readings"])
            await create_integration(conn, new, datetime.now(UTC))
        refused = await sam.api.post("/api/import", content=exported, timeout=120)
        assert refused.status_code == 409, refused.text
        assert "(integrations)" in refused.json()["error"]["message"]
        assert (await sam.api.get("/api/devices")).json()["devices"] == []
    finally:
        await sam.api.aclose()


async def test_an_archive_without_presets_gets_each_default_rule_once(
    exported: bytes,
    client,  # noqa: F811
    postgres_server_url: str,
) -> None:
    """An archive made before the presets were exported: the rules made from one say so (the
    one deleted too, kept as deleted), so none is installed again."""
    parts = members(exported)
    manifest = json.loads(parts.pop("manifest.json"))
    manifest["files"] = [f for f in manifest["files"] if f["name"] != "alert_presets.jsonl"]
    del parts["alert_presets.jsonl"]
    older = retar({**parts, "manifest.json": json.dumps(manifest).encode()})
    tara = await customer(client, "tara@example.com")
    try:
        imported = await tara.api.post("/api/import", content=older, timeout=120)
        assert imported.status_code == 201, imported.text
        rules = (await tara.api.get("/api/alerts/rules")).json()["rules"]
        presets = sorted(r["preset"] for r in rules if r["preset"])
        assert presets == ["co2_high", "offline", "stale_sensor"]
        async with instance_database(postgres_server_url, tara) as conn:
            assert await install_presets(conn) == []
            installed = await conn.fetch(
                "SELECT p.preset FROM alert_presets p JOIN alert_rules r USING (rule_id) "
                "WHERE r.preset = p.preset"
            )
            assert len(installed) == 4  # each pointing at its own rule
    finally:
        await tara.api.aclose()


async def _iotistic(*args: str) -> tuple[int, str]:
    """The ``iotistic`` command, as a customer runs it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from services.cli.main import main; main()",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode()


async def test_the_command_exports_checks_and_imports(
    exported: bytes,
    olga: Customer,
    client,  # noqa: F811
    tmp_path: Path,
    postgres_server_url: str,
) -> None:
    token = olga.auth["Authorization"].removeprefix("Bearer ")
    archive = tmp_path / "olga.tar"
    async with instance_database(postgres_server_url, olga) as conn:
        await conn.execute(
            "INSERT INTO dead_letters (received_at, topic, device_id, reason, payload) "
            "VALUES (now(), 't', NULL, 'malformed: not JSON', '\\x00ff'::bytea)"
        )
    code, said = await _iotistic(
        "export",
        "--instance",
        str(olga.api.base_url),
        "--token",
        token,
        "-o",
        str(archive),
        "--dead-letters",
    )
    assert code == 0, said
    assert "checked" in said and not (tmp_path / "olga.tar.partial").exists()
    # The same data (her events grow meanwhile: the instance reports its usage every second).
    counts = manifest_of(archive.read_bytes())["counts"]
    assert counts.pop("events") >= manifest_of(exported)["counts"]["events"]
    # Asked for, the dead letters come too, their payloads in base64.
    assert counts.pop("dead_letters") == 1
    letter = json.loads(members(archive.read_bytes())["dead_letters.jsonl"])
    assert letter["payload"] == "AP8=" and letter["reason"] == "malformed: not JSON"
    assert "dead_letters.jsonl" not in members(exported)
    assert counts == {k: v for k, v in manifest_of(exported)["counts"].items() if k != "events"}
    rosa = await customer(client, "rosa@example.com")
    try:
        rosa_token = rosa.auth["Authorization"].removeprefix("Bearer ")
        code, said = await _iotistic(
            "import", str(archive), "--instance", str(rosa.api.base_url), "--token", rosa_token
        )
        assert code == 0, said
        assert len((await rosa.api.get("/api/devices")).json()["devices"]) == 2
        # A session of someone else is refused, and the command says so.
        code, said = await _iotistic(
            "export", "--instance", str(rosa.api.base_url), "--token", token, "-o", str(archive)
        )
        assert code == 1 and "404" in said, said
    finally:
        await rosa.api.aclose()


async def test_the_control_plane_gives_an_instance_its_own_customers_events_only(
    olga: Customer,
    pavel: Customer,
    client,  # noqa: F811
) -> None:
    path = f"/api/instances/{olga.id}/events"
    assert (await client.get(path)).status_code == 401
    # Pavel's instance's token (the local backend derives it from USAGE_SECRET) opens his only.
    pavels = {"Authorization": f"Bearer {instance_usage_token('u' * 40, pavel.id)}"}
    assert (await client.get(path, headers=pavels)).status_code == 401
    olgas = {"Authorization": f"Bearer {instance_usage_token('u' * 40, olga.id)}"}
    answer = await client.get(path, headers=olgas)
    assert answer.status_code == 200, answer.text
    *lines, end = [json.loads(line) for line in answer.text.splitlines()]
    assert end["end"]["events"] == len(lines)  # the last line: only a whole answer has it
    assert lines and {line["event"]["customer_id"] for line in lines} == {olga.id}
    assert "CustomerSignedUp" in {line["event"]["type"] for line in lines}
    assert all(line["subject"].split(".")[-2] == line["event"]["type"] for line in lines)


async def test_one_export_or_import_at_a_time(quinn: Customer) -> None:
    """Each holds one of the instance's few database connections for its length: a second
    one meanwhile is told to come back (429), and can once the first is done."""
    sending, go_on = asyncio.Event(), asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"\0" * 1024
        sending.set()
        await go_on.wait()
        yield b"not an archive"

    upload = asyncio.create_task(quinn.api.post("/api/import", content=slow_body(), timeout=60))
    await asyncio.wait_for(sending.wait(), 30)
    busy = await eventually(
        lambda: quinn.api.get("/api/export"),
        lambda r: r.status_code == 429,
        what="the export refused while the import receives",
    )
    assert busy.headers["retry-after"] == "30"
    go_on.set()
    refused = await upload
    assert refused.status_code == 400, refused.text
    assert (await quinn.api.get("/api/export")).status_code == 200
