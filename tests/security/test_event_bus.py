"""The event bus authenticates every client and lets each do only its part (issue 11, item 2).

The attack: any process that reached NATS read the whole log, created and deleted streams and
appended a forged ``SubscriptionActivated`` (enterprise, to 2036) that licensing then signed.
Here NATS is configured exactly as ``iotistic up`` configures its own (``embedded_bus``, the
production stream and subject names, bcrypt at full cost), and a raw ``nats.connect`` tries
each step of the attack, without credentials and with a service's.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import api

from contracts import SubscriptionActivated, UsageReported, encode_envelope, new_envelope
from libs.config import ServiceSettings
from libs.eventlog.bus_auth import OPERATOR, Credentials, inbox_prefix
from libs.eventlog.store import EventStore
from libs.runtime.platform import Platform
from libs.runtime.service import ServiceDefinition
from libs.servers.nats import EmbeddedNats
from services.bus import OwnershipError, event_owners
from services.cli.data_folder import embedded_bus
from services.targets import CONTROL_PLANE, build_app
from support import (
    connect_harness,
    create_database,
    eventually,
    make_platform,
    publish_license_and_wait,
    serving,
)

STREAM = "IOTISTIC_EVENTS"
PREFIX = "iotistic.events"


@dataclass
class Bus:
    server: EmbeddedNats
    credentials: Credentials
    settings: ServiceSettings


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[Bus]:
    """NATS set up as `iotistic up` sets up its own, and settings naming its real stream."""
    folder = tmp_path_factory.mktemp("bus")
    base = ServiceSettings()
    credentials_dir, authorization = embedded_bus(folder, base)
    server = EmbeddedNats(folder / "nats", authorization=authorization)
    server.start()
    settings = msgspec.structs.replace(
        base,
        database_url=database_url,
        nats_url=server.url,
        nats_credentials_dir=str(credentials_dir),
        http_host="127.0.0.1",
        admin_token="a" * 40,
        session_secret="s" * 40,
        data_keys_master_key="k" * 40,
        projection_ack_wait_seconds=5,
    )
    yield Bus(server, Credentials(credentials_dir), settings)
    server.stop()


@pytest.fixture(scope="module")
async def platform(bus: Bus) -> AsyncIterator[Platform]:
    """The whole control plane on that bus, each service as its own bus user."""
    running = make_platform(bus.settings, list(CONTROL_PLANE.values()))
    async with serving(build_app(running, "all")):
        await running.wait_started()
        yield running


class Client:
    """A raw NATS connection as some user, recording what the server refused."""

    def __init__(self, nc: NatsClient, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors

    def refused(self, subject: str) -> bool:
        wanted = f'permissions violation for publish to "{subject.lower()}"'
        return any(wanted in e.lower() for e in self.errors)


async def connect_as(bus: Bus, user: str) -> Client:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(
        bus.server.url,
        user=user,
        password=bus.credentials.password(user),
        inbox_prefix=inbox_prefix(user),
        error_cb=on_error,
        allow_reconnect=False,
    )
    return Client(nc, errors)


async def test_a_client_without_credentials_is_refused(bus: Bus) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await asyncio.wait_for(
            nats.connect(bus.server.url, allow_reconnect=False, connect_timeout=2), 10
        )


async def test_a_wrong_password_is_refused(bus: Bus) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await asyncio.wait_for(
            nats.connect(
                bus.server.url,
                user="billing",
                password="not-the-password",
                allow_reconnect=False,
                connect_timeout=2,
            ),
            10,
        )


async def test_the_server_config_holds_no_password(bus: Bus) -> None:
    config = bus.server.config_path.read_text()
    for user in event_owners().values():
        assert bus.credentials.password(user) not in config
    assert bus.server.config_path.stat().st_mode & 0o077 == 0
    assert bus.credentials.path(OPERATOR).stat().st_mode & 0o077 == 0


async def test_a_forged_subscription_from_another_service_is_refused_by_the_server(
    bus: Bus, platform: Platform
) -> None:
    """Licensing's credentials cannot append billing's events: the forged enterprise
    subscription never reaches the log, so nothing can sign a license from it."""
    forger = await connect_as(bus, "licensing")
    customer = "c0ffee00-0000-4000-8000-000000000001"
    subject = f"{PREFIX}.SubscriptionActivated.{customer}"
    forged = new_envelope(
        SubscriptionActivated(
            customer_id=customer,
            plan="enterprise",
            status="active",
            stripe_customer_id="cus_forged",
            stripe_subscription_id="sub_forged",
            current_period_end=datetime(2036, 1, 1, tzinfo=UTC),
        ),
        customer_id=customer,
    )
    try:
        with pytest.raises((nats.errors.Error, TimeoutError)):
            await forger.nc.jetstream().publish(
                subject, encode_envelope(forged), stream=STREAM, timeout=2
            )
        await eventually(
            lambda: asyncio.sleep(0, forger.refused(subject)),
            lambda refused: refused,
            what="the server's permissions violation",
        )
    finally:
        await forger.nc.close()
    store = platform.services["billing"].events()
    assert await store.count_by_subject(subject) == {}


async def test_each_service_appends_its_own_events(bus: Bus, platform: Platform) -> None:
    # Licensing owns LicenseIssued; appending it as licensing is what the platform does.
    await publish_license_and_wait(
        bus.settings.nats_url,
        bus.settings.database_url,
        credentials_dir=bus.settings.nats_credentials_dir,
    )


async def test_a_service_cannot_read_the_log_other_than_through_its_consumers(
    bus: Bus, platform: Platform
) -> None:
    spy = await connect_as(bus, "licensing")
    js = spy.nc.jetstream()
    try:
        attempts = {
            # Another service's consumer: reading, resetting or deleting it.
            f"$JS.API.CONSUMER.CREATE.{STREAM}.billing_subscriptions": js.add_consumer(
                STREAM,
                api.ConsumerConfig(
                    name="billing_subscriptions", durable_name="billing_subscriptions"
                ),
                timeout=1,
            ),
            f"$JS.API.CONSUMER.DELETE.{STREAM}.billing_subscriptions": js.delete_consumer(
                STREAM, "billing_subscriptions"
            ),
            # An ephemeral consumer of its own choosing.
            f"$JS.API.CONSUMER.CREATE.{STREAM}": js.add_consumer(
                STREAM, api.ConsumerConfig(ack_policy=api.AckPolicy.NONE), timeout=1
            ),
            # Messages by sequence or by subject.
            f"$JS.API.STREAM.MSG.GET.{STREAM}": js.get_msg(STREAM, 1),
            f"$JS.API.DIRECT.GET.{STREAM}": js.get_msg(STREAM, 1, direct=True),
            # What exists.
            f"$JS.API.CONSUMER.LIST.{STREAM}": js.consumers_info(STREAM),
            "$JS.API.STREAM.LIST": js.streams_info(),
        }
        for subject, attempt in attempts.items():
            with pytest.raises((nats.errors.Error, TimeoutError)):
                await asyncio.wait_for(attempt, 3)
            await eventually(
                lambda s=subject: asyncio.sleep(0, spy.refused(s)),
                lambda refused: refused,
                what=f"refusal of {subject}",
            )
    finally:
        await spy.nc.close()


async def test_a_service_cannot_change_or_remove_the_log(bus: Bus, platform: Platform) -> None:
    vandal = await connect_as(bus, "provisioner")
    js = vandal.nc.jetstream()
    store = platform.services["provisioner"].events()
    before = await store.last_seq()
    try:
        attempts = {
            f"$JS.API.STREAM.DELETE.{STREAM}": js.delete_stream(STREAM),
            f"$JS.API.STREAM.PURGE.{STREAM}": js.purge_stream(STREAM),
            f"$JS.API.STREAM.UPDATE.{STREAM}": js.update_stream(
                api.StreamConfig(name=STREAM, subjects=[f"{PREFIX}.>"], max_age=1.0)
            ),
            "$JS.API.STREAM.CREATE.STOLEN": js.add_stream(name="STOLEN", subjects=["stolen.>"]),
        }
        for subject, attempt in attempts.items():
            with pytest.raises((nats.errors.Error, TimeoutError)):
                await asyncio.wait_for(attempt, 3)
            await eventually(
                lambda s=subject: asyncio.sleep(0, vandal.refused(s)),
                lambda refused: refused,
                what=f"refusal of {subject}",
            )
    finally:
        await vandal.nc.close()
    info = await store.stream_info()
    assert info.state.last_seq >= before and info.config.max_age == 0


async def test_a_service_cannot_listen_to_events_or_to_others_replies(bus: Bus) -> None:
    eavesdropper = await connect_as(bus, "signup")
    try:
        for subject in (f"{PREFIX}.>", "_INBOX.billing.>", "_INBOX.operator.>", ">"):
            await eavesdropper.nc.subscribe(subject)
            await eavesdropper.nc.flush()
            await eventually(
                lambda s=subject: asyncio.sleep(
                    0,
                    any(
                        f'permissions violation for subscription to "{s.lower()}"' in e.lower()
                        for e in eavesdropper.errors
                    ),
                ),
                lambda refused: refused,
                what=f"refusal to subscribe to {subject}",
            )
    finally:
        await eavesdropper.nc.close()


async def test_the_operator_reads_but_does_not_append(bus: Bus, platform: Platform) -> None:
    operator = await connect_as(bus, OPERATOR)
    try:
        reader = EventStore(operator.nc.jetstream(), bus.settings)
        assert [m.seq async for m in reader.read(from_seq=1)]  # the log is readable to it
        subject = f"{PREFIX}.LicenseIssued.c0ffee00-0000-4000-8000-000000000002"
        with pytest.raises((nats.errors.Error, TimeoutError)):
            await operator.nc.jetstream().publish(subject, b"{}", stream=STREAM, timeout=2)
        await eventually(
            lambda: asyncio.sleep(0, operator.refused(subject)),
            lambda refused: refused,
            what="refusal of the operator's append",
        )
    finally:
        await operator.nc.close()


async def test_billing_reads_a_customers_events_only_through_its_reader(
    bus: Bus, platform: Platform
) -> None:
    """The export of a customer's events (``services/billing/customer_events.py``): billing's
    bus user may create the reader consumer it declares, and no consumer of another name."""
    billing = await connect_as(bus, "billing")
    try:
        store = EventStore(billing.nc.jetstream(), bus.settings)
        customer = "c0ffee00-0000-4000-8000-000000000009"
        await store.publish(
            UsageReported(
                customer_id=customer,
                day=datetime.now(UTC).date(),
                devices=1,
                mqtt_messages=2,
                api_requests=3,
                rejected_readings=0,
                storage_bytes=4,
            ),
            customer_id=customer,
        )
        read = [
            m.subject
            async for m in store.read(
                filters=[store.customer_filter(customer)],
                consumer_name="billing_customer_events",
            )
        ]
        assert read == [f"{PREFIX}.UsageReported.{customer}"]  # through billing's reader
        # The name is free again at once, for the next export's read.
        assert [m.seq async for m in store.read(consumer_name="billing_customer_events")]
        subject = f"$JS.API.CONSUMER.CREATE.{STREAM}.billing_anything_else"
        with pytest.raises((nats.errors.Error, TimeoutError)):
            await asyncio.wait_for(store.read(consumer_name="billing_anything_else").__anext__(), 3)
        await eventually(
            lambda: asyncio.sleep(0, billing.refused(subject)),
            lambda refused: refused,
            what="refusal of a consumer billing does not declare",
        )
    finally:
        await billing.nc.close()


def _outside_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("10.255.255.255", 1))  # no packet is sent: it only picks a route
        return str(probe.getsockname()[0])


async def test_the_monitoring_port_answers_on_loopback_only(bus: Bus) -> None:
    port = bus.server.monitor_port

    def status() -> int:
        url = f"http://127.0.0.1:{port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return int(answer.status)

    assert await asyncio.to_thread(status) == 200
    address = _outside_address()
    assert not address.startswith("127.")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, port), timeout=2).close()


def test_every_event_type_has_exactly_one_owner() -> None:
    owners = event_owners()
    assert owners["SubscriptionActivated"] == "billing"
    assert owners["LicenseIssued"] == "licensing"
    assert owners["CustomerSignedUp"] == "signup"
    assert owners["DeploymentRequested"] == "provisioner"


def test_two_services_declaring_one_event_are_refused() -> None:
    thief = ServiceDefinition(
        name="thief",
        migrations_package="services.signup.migrations",
        emits=(SubscriptionActivated,),
    )
    with pytest.raises(OwnershipError, match="SubscriptionActivated"):
        event_owners([*CONTROL_PLANE.values(), thief])


def test_an_event_nobody_owns_is_refused() -> None:
    without_billing = [d for d in CONTROL_PLANE.values() if d.name != "billing"]
    with pytest.raises(OwnershipError, match="no service owns"):
        event_owners(without_billing)


def test_a_service_connects_without_its_password_file_only_with_a_clear_error(
    tmp_path: Path,
) -> None:
    from libs.config import ConfigError

    (tmp_path / "signup").write_text("x")
    environ = {"NATS_CREDENTIALS_DIR": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"NATS_CREDENTIALS_DIR: no bus password for licensing"):
        Platform.from_environ([CONTROL_PLANE["licensing"]], environ)


async def test_a_service_waits_not_ready_until_the_operator_makes_the_stream(
    tmp_path: Path, postgres_server_url: str
) -> None:
    """In production a service holds only its own password: it cannot make the stream, so it
    says why it is not ready until `iotistic events init` (the operator) has made it."""
    settings = ServiceSettings(events_stream="LATE_EVENTS", events_subject_prefix="late.events")
    credentials_dir, authorization = embedded_bus(tmp_path / "platform", settings)
    server = EmbeddedNats(tmp_path / "nats", authorization=authorization)
    server.start()
    try:
        own_only = tmp_path / "licensing-pod"
        own_only.mkdir(mode=0o700)
        (own_only / "licensing").write_text(Credentials(credentials_dir).password("licensing"))
        pod = msgspec.structs.replace(
            settings,
            # A database of its own: the module's holds checkpoints of another stream.
            database_url=await create_database(postgres_server_url),
            nats_url=server.url,
            nats_credentials_dir=str(own_only),
            http_host="127.0.0.1",
        )
        licensing = make_platform(pod, [CONTROL_PLANE["licensing"]])
        async with serving(build_app(licensing, "licensing")) as http:
            answer = await eventually(
                lambda: http.get("/health/ready"),
                lambda r: "does not exist" in r.text,
                what="readiness naming the missing stream",
            )
            assert answer.status_code == 503
            assert "iotistic events init" in answer.json()["nats"]["error"]
            environ = {
                **os.environ,
                "NATS_URL": server.url,
                "NATS_CREDENTIALS_DIR": str(credentials_dir),
                "EVENTS_STREAM": settings.events_stream,
                "EVENTS_SUBJECT_PREFIX": settings.events_subject_prefix,
                "IOTISTIC_DATA_DIR": str(tmp_path / "none"),
            }
            made = await asyncio.to_thread(
                subprocess.run,
                [str(Path(sys.executable).parent / "iotistic"), "events", "init"],
                env=environ,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert made.returncode == 0, made.stderr
            assert "stream LATE_EVENTS" in made.stdout
            await eventually(
                lambda: http.get("/health/ready"),
                lambda r: r.status_code == 200,
                timeout=30,
                what="ready once the stream exists",
            )
            assert "error" not in (await http.get("/health/ready")).json()["nats"]
    finally:
        server.stop()


async def test_a_bus_that_lets_anyone_in_is_not_ready(
    tmp_path: Path, postgres_server_url: str
) -> None:
    """Credentials given but a NATS server deployed without its authorization block: the bus
    is open to anyone, and readiness says so instead of serving over it."""
    server = EmbeddedNats(tmp_path / "open-nats")
    server.start()
    try:
        credentials = Credentials(tmp_path / "credentials")
        credentials.ensure(["licensing"])
        pod = ServiceSettings(
            database_url=await create_database(postgres_server_url),
            nats_url=server.url,
            nats_credentials_dir=str(credentials.folder),
            http_host="127.0.0.1",
        )
        # Without the operator's password the service cannot make the stream: the harness does.
        async with await connect_harness(server.url) as nc:
            await EventStore(nc.jetstream(), pod).ensure_stream()
        licensing = make_platform(pod, [CONTROL_PLANE["licensing"]])
        async with serving(build_app(licensing, "licensing")) as http:
            await licensing.wait_started()
            answer = await http.get("/health/ready")
            assert answer.status_code == 503
            assert "asks for no credentials" in answer.json()["nats"]["error"]
    finally:
        server.stop()


async def test_an_event_whose_envelope_claims_another_type_than_its_subject_is_refused(
    bus: Bus, platform: Platform
) -> None:
    """The server lets signup append on its own subjects only; a body there that claims to be
    billing's SubscriptionActivated (enterprise, to 2036) is a forgery. It reaches the log, but
    no projection or reactor applies it: no subscription, no license, and it is counted."""
    forger = await connect_as(bus, "signup")
    customer = "c0ffee00-0000-4000-8000-000000000003"
    subject = f"{PREFIX}.CustomerSignedUp.{customer}"
    forged = new_envelope(
        SubscriptionActivated(
            customer_id=customer,
            plan="enterprise",
            status="active",
            stripe_customer_id="cus_forged",
            stripe_subscription_id="sub_forged",
            current_period_end=datetime(2036, 1, 1, tzinfo=UTC),
        ),
        customer_id=customer,
    )
    try:
        ack = await forger.nc.jetstream().publish(
            subject, encode_envelope(forged), stream=STREAM, timeout=5
        )
    finally:
        await forger.nc.close()

    def refused() -> float:
        return sum(
            sample.value
            for metric in platform.registry.collect()
            for sample in metric.samples
            if sample.name == "iotistic_projection_events_total"
            and sample.labels.get("outcome") == "refused"
        )

    # Every consumer of CustomerSignedUp (signup's accounts, billing's trials and customers,
    # licensing's reactor) passes the forgery by, each counting it.
    runners = [
        r
        for runtime in platform.services.values()
        for r in runtime.runners
        if "CustomerSignedUp" in r.projection.event_types
    ]
    assert len(runners) >= 3
    await eventually(
        lambda: asyncio.sleep(0, all(r.status.checkpoint >= ack.seq for r in runners)),
        what="every consumer of the subject past the forgery",
    )
    assert refused() >= len(runners)
    db = platform.services["billing"].db()
    assert await db.fetchval(
        "SELECT count(*) FROM billing.subscriptions WHERE customer_id = $1", customer
    ) in (0, None)
    licensing = platform.services["licensing"].db()
    assert await licensing.fetchval(
        "SELECT count(*) FROM licensing.licenses WHERE customer_id = $1", customer
    ) in (0, None)


def test_an_empty_or_loose_password_file_is_made_again_owner_only(tmp_path: Path) -> None:
    credentials = Credentials(tmp_path / "nats")
    credentials.ensure(["signup", "billing"])
    kept = credentials.password("billing")
    credentials.path("signup").write_text("")
    credentials.path("billing").chmod(0o644)
    credentials.folder.chmod(0o755)
    credentials.ensure(["signup", "billing"])
    assert len(credentials.password("signup")) >= 32
    assert credentials.password("billing") == kept
    assert credentials.path("billing").stat().st_mode & 0o077 == 0
    assert credentials.folder.stat().st_mode & 0o077 == 0


async def test_a_refused_password_is_named_in_readiness(bus: Bus, postgres_server_url: str) -> None:
    folder = Path(bus.settings.nats_credentials_dir or "").parent / "wrong-licensing"
    folder.mkdir(mode=0o700, exist_ok=True)
    (folder / "licensing").write_text("not-the-password")
    pod = msgspec.structs.replace(
        bus.settings,
        database_url=await create_database(postgres_server_url),
        nats_credentials_dir=str(folder),
    )
    licensing = make_platform(pod, [CONTROL_PLANE["licensing"]])
    async with serving(build_app(licensing, "licensing")) as http:
        answer = await eventually(
            lambda: http.get("/health/ready"),
            lambda r: "refused the credentials" in r.text,
            what="readiness naming the refused credentials",
        )
        assert answer.status_code == 503
        assert "licensing" in answer.json()["nats"]["error"]
