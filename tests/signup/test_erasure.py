"""Right to erasure on an immutable log: a customer's personal data is on the log only sealed
with their data key; erasing them destroys the key, every view drops what it held, replay
still rebuilds the same views, and no personal datum of theirs can be read anywhere: not in
the raw bytes of the stream, not in any table of any schema, not in the mail outbox.

Signup, licensing and billing on real Postgres and JetStream; the customer signs up, verifies
their email and closes the account through signup's own API, as a customer does.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from subprocess import CompletedProcess

import asyncpg
import httpx
import msgspec
import pytest
from account_flows import PASSWORD, PUBLIC_URL, bearer, close_account, log_in, new_email

from contracts import (
    CustomerSignedUp,
    EmailVerified,
    PersonalData,
    decode_envelope,
    decode_event,
)
from libs.config import ServiceSettings
from libs.eventlog.store import EventStore
from libs.runtime.platform import Platform
from libs.sealing.vault import SealingError, data_key_for, master_key, open_sealed, seal
from services.billing.app import BILLING
from services.cli.main import main
from services.licensing.app import LICENSING
from services.signup.app import SIGNUP
from services.targets import build_app
from support import (
    SUITE_SIGNUP_LIMITS,
    assert_replays_clean,
    eventually,
    license_keys_dir,
    serving,
)

IOTISTIC = str(Path(sys.executable).parent / "iotistic")
VERIFY_LINK = re.compile(re.escape(PUBLIC_URL + "/verify") + r"\?token=([A-Za-z0-9_-]+)")


@pytest.fixture(scope="module")
async def platform(settings: ServiceSettings, store: EventStore) -> Platform:
    return Platform.from_settings(
        settings,
        [SIGNUP, LICENSING, BILLING],
        license_keys_dir=license_keys_dir(),
        argon2_memory_kib=8192,
        argon2_time_cost=1,
        public_url=PUBLIC_URL,
        **SUITE_SIGNUP_LIMITS,
    )


@pytest.fixture(scope="module")
async def client(platform: Platform) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(build_app(platform, "all")) as http:
        await platform.wait_started()
        yield http


@pytest.fixture(scope="module")
def admin(settings: ServiceSettings) -> dict[str, str]:
    assert settings.admin_token
    return bearer(settings.admin_token)


class Person(msgspec.Struct, frozen=True, kw_only=True):
    """Someone signing up, with details found nowhere else in the suite."""

    email: str
    company_name: str
    full_name: str

    @classmethod
    def new(cls, label: str) -> Person:
        tag = secrets.token_hex(4)
        return cls(
            email=new_email(f"{label}-{tag}"),
            company_name=f"Quillfeather {tag} Air Analytics",
            full_name=f"Perpetua Vantongeren-{tag}",
        )

    @property
    def strings(self) -> list[str]:
        return [self.email, self.company_name, self.full_name]


async def sign_up(client: httpx.AsyncClient, person: Person) -> str:
    body = {
        "email": person.email,
        "password": PASSWORD,
        "company_name": person.company_name,
        "full_name": person.full_name,
    }
    # With an Idempotency-Key: its stored answer names the customer too.
    headers = {"Idempotency-Key": f"erasure-{secrets.token_hex(8)}"}
    answer = await client.post("/api/customers/signup", json=body, headers=headers)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["customer"]["customer_id"])


async def verify_email(client: httpx.AsyncClient, platform: Platform, person: Person) -> None:
    pool = platform.runtime_of("signup").db()

    async def links() -> list[str]:
        rows = await pool.fetch("SELECT body FROM mail_outbox WHERE recipient = $1", person.email)
        return [m for row in rows for m in VERIFY_LINK.findall(row["body"] or "")]

    token = (await eventually(links, bool, what=f"a verification link to {person.email}"))[-1]
    opened = await client.get("/verify", params={"token": token})
    assert opened.status_code == 200, opened.text
    await eventually(
        lambda: pool.fetchval(
            "SELECT email_verified FROM accounts WHERE email = $1", person.email.lower()
        ),
        what="the verified email in the account view",
    )


async def stream_bytes(store: EventStore) -> list[bytes]:
    """Every message of the log as stored: subject, headers and body, raw."""
    info = await store.stream_info()
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await store.js.get_msg(store.stream, seq)
        headers = b"".join(f"{k}:{v}".encode() for k, v in (msg.headers or {}).items())
        found.append((msg.subject or "").encode() + headers + (msg.data or b""))
    return found


async def tables_text(database_url: str) -> dict[str, str]:
    """Every row of every table of every schema of the platform's database, as text."""
    conn = await asyncpg.connect(database_url)
    try:
        tables = await conn.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_type = 'BASE TABLE' "
            "AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        )
        found = {}
        for t in tables:
            name = f'"{t["table_schema"]}"."{t["table_name"]}"'
            rows = await conn.fetch(f"SELECT t::text AS row FROM {name} t")
            found[name] = "\n".join(r["row"] for r in rows)
        return found
    finally:
        await conn.close()


def readable(person: Person, haystacks: dict[str, str] | list[bytes]) -> list[str]:
    """Where any of the person's details can be read (any case)."""
    needles = [s.lower() for s in person.strings]
    items = haystacks.items() if isinstance(haystacks, dict) else enumerate(haystacks)
    hits = []
    for where, text in items:
        lowered = (text.decode("utf-8", "replace") if isinstance(text, bytes) else text).lower()
        hits += [f"{where}: {n}" for n in needles if n in lowered]
    return hits


async def erased_everywhere(platform: Platform, customer_id: str) -> None:
    signup = platform.runtime_of("signup").db()
    billing = platform.runtime_of("billing").db()
    await eventually(
        lambda: signup.fetchval(
            "SELECT erased_at IS NOT NULL FROM accounts WHERE customer_id = $1", customer_id
        ),
        what="the account view showing the erasure",
    )
    await eventually(
        lambda: billing.fetchval(
            "SELECT erased_at IS NOT NULL FROM billing_customers WHERE customer_id = $1",
            customer_id,
        ),
        what="billing's customers showing the erasure",
    )


async def test_an_erased_customer_can_be_read_nowhere_and_replay_still_works(
    client, platform: Platform, store: EventStore, settings: ServiceSettings, admin
) -> None:
    person, other = Person.new("erased"), Person.new("kept")
    customer_id = await sign_up(client, person)
    other_id = await sign_up(client, other)
    await verify_email(client, platform, person)
    session = await log_in(client, person.email)

    # Sealed from the start: the log never held their details in the clear...
    on_log = await stream_bytes(store)
    assert any(customer_id.encode() in m for m in on_log), "the scan reads the events"
    assert readable(person, on_log) == []
    # ...while the views did (the scan finds what is there).
    assert len(readable(person, await tables_text(settings.database_url))) >= 3

    refused = await client.post(f"/api/customers/{customer_id}/erase", headers=admin)
    assert refused.status_code == 409, refused.text
    assert "close it first" in refused.json()["error"]["message"]

    await close_account(client, session)
    vault_row = (
        await platform.runtime_of("signup")
        .db()
        .fetchrow(
            "SELECT wrapped_key FROM data_keys.customer_keys WHERE customer_id = $1", customer_id
        )
    )
    assert vault_row["wrapped_key"] is not None
    erased = await client.post(f"/api/customers/{customer_id}/erase", headers=admin)
    assert erased.status_code == 200, erased.text
    assert erased.json()["key_id"].startswith("dk-")
    again = await client.post(f"/api/customers/{customer_id}/erase", headers=admin)
    assert again.json() == erased.json(), "a retried erasure answers the first outcome"
    await erased_everywhere(platform, customer_id)

    assert readable(person, await stream_bytes(store)) == []
    assert readable(person, await tables_text(settings.database_url)) == []
    # The other customer is untouched.
    assert len(readable(other, await tables_text(settings.database_url))) >= 3
    view = await client.get("/api/customers/me", headers=bearer(await log_in(client, other.email)))
    assert view.json()["customer"]["company_name"] == other.company_name

    # The history stays valid: every view rebuilds from the log to what it is now.
    await assert_replays_clean(settings.database_url, store, [SIGNUP, LICENSING, BILLING])
    # A vault restored from a backup older than the erasure: the key follows the log again.
    pool = platform.runtime_of("signup").db()
    await pool.execute(
        "UPDATE data_keys.customer_keys SET wrapped_key = $2, destroyed_at = NULL "
        "WHERE customer_id = $1",
        customer_id,
        vault_row["wrapped_key"],
    )
    await assert_replays_clean(settings.database_url, store, [SIGNUP])
    assert await pool.fetchval(
        "SELECT wrapped_key IS NULL FROM data_keys.customer_keys WHERE customer_id = $1",
        customer_id,
    )
    events = await store.count_by_subject(f"{store.prefix}.CustomerErased.{customer_id}")
    assert sum(events.values()) == 1
    login = await client.post(
        "/api/customers/login", json={"email": person.email, "password": PASSWORD}
    )
    assert login.status_code == 401
    assert other_id != customer_id


async def test_closing_with_erase_erases_at_once(
    client, platform: Platform, store: EventStore, settings: ServiceSettings
) -> None:
    person = Person.new("closes-erasing")
    customer_id = await sign_up(client, person)
    session = await log_in(client, person.email)
    # Their reason, in their words, names someone: sealed like their name.
    reason = f"moving on; ask {person.full_name}"
    closed = await client.post(
        "/api/customers/me/close",
        json={"password": PASSWORD, "erase": True, "reason": reason},
        headers=bearer(session),
    )
    assert closed.status_code == 200, closed.text
    await erased_everywhere(platform, customer_id)
    assert readable(person, await stream_bytes(store)) == []
    assert readable(person, await tables_text(settings.database_url)) == []
    await assert_replays_clean(settings.database_url, store, [SIGNUP, BILLING])


async def test_an_erased_email_can_sign_up_again_once(client, platform: Platform) -> None:
    person = Person.new("comes-back")
    first = await sign_up(client, person)
    session = await log_in(client, person.email)
    closed = await client.post(
        "/api/customers/me/close",
        json={"password": PASSWORD, "erase": True},
        headers=bearer(session),
    )
    assert closed.status_code == 200, closed.text
    await erased_everywhere(platform, first)

    # The email's subject on the log still holds the erased signup: released, not taken.
    again = await sign_up(client, person)
    assert again != first
    view = await client.get("/api/customers/me", headers=bearer(await log_in(client, person.email)))
    assert view.json()["customer"]["customer_id"] == again
    # And it is this customer's now: another signup of the email is refused.
    body = {"email": person.email, "password": "another passphrase 42", "company_name": "X"}
    taken = await client.post("/api/customers/signup", json=body)
    assert taken.status_code == 409, taken.text


async def test_erasure_is_for_operators_and_for_customers_that_exist(client, admin) -> None:
    nobody = await client.post("/api/customers/no-such-customer/erase", headers=admin)
    assert nobody.status_code == 404, nobody.text
    anonymous = await client.post("/api/customers/no-such-customer/erase")
    assert anonymous.status_code == 401
    forged = await client.post("/api/customers/no-such-customer/erase", headers=bearer("x" * 43))
    assert forged.status_code == 401
    huge = await client.post(f"/api/customers/{'a' * 5000}/erase", headers=admin)
    assert huge.status_code == 404


async def test_sealed_data_opens_only_for_its_customer_and_event_type(
    client, platform: Platform, settings: ServiceSettings
) -> None:
    assert settings.data_keys_master_key
    master = master_key(settings.data_keys_master_key)
    pool = platform.runtime_of("signup").db()
    mine, theirs = Person.new("mine"), Person.new("theirs")
    mine_id, theirs_id = await sign_up(client, mine), await sign_up(client, theirs)
    async with pool.acquire() as conn:
        key = await data_key_for(conn, master, mine_id)
        sealed = seal(key, CustomerSignedUp.TYPE, PersonalData(email=mine.email))
        opened = await open_sealed(conn, mine_id, CustomerSignedUp.TYPE, sealed)
        assert opened == PersonalData(email=mine.email)
        # Copied into another customer's event, or another type of event: it does not open.
        with pytest.raises(SealingError):
            await open_sealed(conn, theirs_id, CustomerSignedUp.TYPE, sealed)
        with pytest.raises(SealingError):
            await open_sealed(conn, mine_id, EmailVerified.TYPE, sealed)
        tampered = msgspec.structs.replace(
            sealed, ciphertext=bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
        )
        with pytest.raises(SealingError):
            await open_sealed(conn, mine_id, CustomerSignedUp.TYPE, tampered)


async def test_old_events_in_the_clear_stay_readable(
    platform: Platform, store: EventStore, client
) -> None:
    """A version 1 CustomerSignedUp (personal data in the clear) still opens an account."""
    customer_id = "legacy-" + secrets.token_hex(6)
    email = f"{customer_id}@example.com"
    await store.publish(
        CustomerSignedUp(
            customer_id=customer_id,
            email=email,
            email_display=email,
            company_name="Legacy Air",
            signed_up_at=datetime.now(UTC),
        ),
        customer_id=customer_id,
    )
    pool = platform.runtime_of("signup").db()
    row = await eventually(
        lambda: pool.fetchrow("SELECT * FROM accounts WHERE customer_id = $1", customer_id),
        what="the legacy account",
    )
    assert (row["email"], row["company_name"]) == (email, "Legacy Air")
    stored = (
        await store.js.get_last_msg(store.stream, f"{store.prefix}.CustomerSignedUp.{customer_id}")
    ).data
    assert decode_event(decode_envelope(stored)).email == email  # type: ignore[attr-defined]


def run_cli(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as done:
        return int(done.code or 0)
    return 0


async def test_iotistic_erase_calls_the_admin_route(
    client, platform: Platform, settings: ServiceSettings, tmp_path, monkeypatch, capsys
) -> None:
    person = Person.new("cli")
    customer_id = await sign_up(client, person)
    url = str(client.base_url)
    argv = ["--data-dir", str(tmp_path), "erase", customer_id, "--url", url]
    monkeypatch.delenv("ADMIN_TOKEN", raising=False)
    assert await asyncio.to_thread(run_cli, argv) == 2, "no admin token: a configuration error"
    monkeypatch.setenv("ADMIN_TOKEN", str(settings.admin_token))
    assert await asyncio.to_thread(run_cli, argv) == 1, "an open account is refused"
    await close_account(client, await log_in(client, person.email))
    capsys.readouterr()
    assert await asyncio.to_thread(run_cli, argv) == 0
    assert json.loads(capsys.readouterr().out)["customer_id"] == customer_id
    await erased_everywhere(platform, customer_id)


def replay_verify(settings: ServiceSettings, service: str, **env: str) -> CompletedProcess[str]:
    """`iotistic replay <service> --verify`, in a process of its own (no key loaded but its own)."""
    environ = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "NATS_URL": settings.nats_url,
        "NATS_CREDENTIALS_DIR": settings.nats_credentials_dir or "",
        "EVENTS_STREAM": settings.events_stream,
        "EVENTS_SUBJECT_PREFIX": settings.events_subject_prefix,
        "IOTISTIC_DATA_DIR": "/nonexistent",
        **env,
    }
    if "DATA_KEYS_MASTER_KEY" not in env:
        environ.pop("DATA_KEYS_MASTER_KEY", None)
    return subprocess.run(
        [IOTISTIC, "replay", service, "--verify"],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_the_replay_command_opens_sealed_data_with_the_master_key_only(
    client, platform: Platform, settings: ServiceSettings, admin
) -> None:
    person = Person.new("replayed")
    customer_id = await sign_up(client, person)
    await close_account(client, await log_in(client, person.email))
    assert (await client.post(f"/api/customers/{customer_id}/erase", headers=admin)).is_success
    await erased_everywhere(platform, customer_id)
    assert settings.data_keys_master_key
    for service in ("signup", "billing"):
        clean = await asyncio.to_thread(
            replay_verify, settings, service, DATA_KEYS_MASTER_KEY=settings.data_keys_master_key
        )
        assert clean.returncode == 0, clean.stdout + clean.stderr
        assert "no differences" in clean.stdout
    # Without the master key, sealed data that is not erased cannot be opened: the replay
    # fails, and says why, instead of passing every customer off as erased.
    keyless = await asyncio.to_thread(replay_verify, settings, "signup")
    assert keyless.returncode != 0
    assert "DATA_KEYS_MASTER_KEY" in keyless.stdout + keyless.stderr
