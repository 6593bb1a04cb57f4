"""A malicious tenant's forged archive: every field of every JSON-lines part given a hostile
value (NaN, a number too big for any column, an object where a scalar belongs, a negative
number), its manifest made to match so only the content is wrong. Each import answers 201 or a
4xx naming the file, never a 500, and a refused one writes nothing. Real instances, Postgres,
NATS and Mosquitto (the fixtures of test_export).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from export_steps import members, retar, sha256
from test_export import exported, olga  # noqa: F401 - fixtures
from test_instance import client, customer  # noqa: F401 - client is a fixture

pytestmark = pytest.mark.slow

HOSTILE: list[Any] = [float("nan"), 10**30, {"a": [1]}, -1]


def _forge(exported_: bytes, name: str, field: str, value: Any) -> bytes:
    parts = members(exported_)
    lines = parts[name].splitlines()
    first = json.loads(lines[0]) | {field: value}
    body = b"\n".join([json.dumps(first).encode(), *lines[1:]]) + b"\n"
    manifest = json.loads(parts.pop("manifest.json"))
    for entry in manifest["files"]:
        if entry["name"] == name:
            entry |= {"sha256": sha256(body), "bytes": len(body)}
    parts[name] = body
    return retar({**parts, "manifest.json": json.dumps(manifest).encode()})


CASES = 24


async def test_no_forged_field_is_a_500(exported: bytes, client) -> None:  # noqa: F811
    parts = members(exported)
    fields = [
        (name, key)
        for name, body in parts.items()
        if name.endswith(".jsonl") and body.strip()
        for key in json.loads(body.splitlines()[0])
    ]
    assert fields
    # Every field with one hostile value each, in turn, at most CASES of them spread over
    # all parts: the whole cross product takes 11 minutes, too long for the suite.
    cases = [(n, k, HOSTILE[i % len(HOSTILE)]) for i, (n, k) in enumerate(fields)]
    cases = cases[:: max(1, len(cases) // CASES)][:CASES]
    target = await customer(client, "fuzz0@example.com")
    failures: list[str] = []
    made = 0
    for name, key, value in cases:
        answer = await target.api.post(
            "/api/import", content=_forge(exported, name, key, value), timeout=120
        )
        if answer.status_code >= 500:
            failures.append(f"{name} {key}={value!r}: {answer.status_code} {answer.text[:300]}")
        elif answer.status_code == 201:
            made += 1
            await target.api.aclose()
            target = await customer(client, f"fuzz{made}@example.com")
        elif answer.status_code != 400 or not answer.json()["error"].get("fields"):
            failures.append(f"{name} {key}={value!r}: {answer.status_code} {answer.text[:300]}")
        elif (await target.api.get("/api/devices")).json()["devices"]:
            failures.append(f"{name} {key}={value!r}: refused but wrote devices")
    await target.api.aclose()
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "forge",
    [
        {"url": "javascript:alert(document.cookie)"},
        {"url": "file:///etc/passwd"},
        {"url": "https://hooks.example.com/" + "a" * 5000},
        {"name": "n" * 5000},
        {"name": ""},
    ],
)
async def test_a_forged_integration_url_or_name_is_refused(
    exported: bytes,  # noqa: F811
    client,  # noqa: F811
    forge: dict[str, Any],
) -> None:
    target = await customer(client, f"forged-{len(str(forge))}-{next(iter(forge))}@example.com")
    try:
        name = "integrations.jsonl"
        archive = _forge(exported, name, next(iter(forge)), next(iter(forge.values())))
        refused = await target.api.post("/api/import", content=archive, timeout=120)
        assert refused.status_code == 400, refused.text
        [field] = refused.json()["error"]["fields"]
        assert field["field"] == name, field
        assert (await target.api.get("/api/devices")).json()["devices"] == []
    finally:
        await target.api.aclose()
