"""The ingest's MQTT 5 subscriber against a real Mosquitto: flow control by the receive
maximum, acknowledgement only when asked, redelivery of what was not acknowledged, large
packets split across reads, and clear errors."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Callable

import aiomqtt
import pytest

from libs.mqtt.dynsec import Acl, DynSec
from libs.mqtt.subscriber import (
    MqttSubscriber,
    MqttSubscriberError,
    SubscriberOptions,
    _Protocol,
)
from libs.servers.mosquitto import EmbeddedMosquitto

ROOT = "sub-tests"


@pytest.fixture(scope="module")
async def users(broker: EmbeddedMosquitto) -> tuple[str, str]:
    """A client that may publish and read ``sub-tests/#``; its name and password."""
    async with DynSec(
        broker.host, broker.port, broker.admin_username, broker.admin_password
    ) as dynsec:
        await dynsec.ensure_role(
            "sub-tests",
            [
                Acl("subscribePattern", f"{ROOT}/#"),
                Acl("publishClientReceive", f"{ROOT}/#"),
                Acl("publishClientSend", f"{ROOT}/#"),
            ],
        )
        await dynsec.ensure_client("sub-tests", "sub-tests-password", ["sub-tests"])
    return "sub-tests", "sub-tests-password"


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for ``condition`` to hold; fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


class Inbox:
    """What a subscriber was given: (topic, payload, packet id)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, int]] = []

    def __call__(self, topic: str, payload: bytes, packet_id: int) -> None:
        self.messages.append((topic, payload, packet_id))

    @property
    def payloads(self) -> list[bytes]:
        return [m[1] for m in self.messages]


@contextlib.asynccontextmanager
async def subscribed(
    broker: EmbeddedMosquitto,
    users: tuple[str, str],
    inbox: Inbox,
    client_id: str,
    topic: str,
    **options: int,
) -> AsyncIterator[MqttSubscriber]:
    subscriber = MqttSubscriber(
        SubscriberOptions(
            host=broker.host,
            port=broker.port,
            client_id=client_id,
            username=users[0],
            password=users[1],
            filters=(topic,),
            **options,
        ),
        inbox,
    )
    task = asyncio.create_task(subscriber.run())
    waiting = asyncio.create_task(subscriber.subscribed.wait())
    await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED)
    assert not task.done(), task.exception()
    try:
        yield subscriber
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, MqttSubscriberError):
            await task


async def publish(
    broker: EmbeddedMosquitto, users: tuple[str, str], topic: str, payloads: list[bytes]
) -> None:
    async with aiomqtt.Client(
        broker.host, broker.port, username=users[0], password=users[1]
    ) as client:
        for payload in payloads:
            await client.publish(topic, payload, qos=1)


async def test_the_broker_holds_back_what_is_past_the_receive_maximum(broker, users) -> None:
    inbox = Inbox()
    topic = f"{ROOT}/{uuid.uuid4().hex[:8]}/#"
    async with subscribed(broker, users, inbox, "held-back", topic, receive_maximum=5) as sub:
        await publish(broker, users, topic.replace("#", "r"), [b"%d" % i for i in range(20)])
        await until(lambda: len(inbox.messages) == 5)
        await asyncio.sleep(0.3)
        assert len(inbox.messages) == 5  # nothing more until they are acknowledged
        assert sub.ack(sub.connection, [m[2] for m in inbox.messages]) == 5
        await until(lambda: len(inbox.messages) > 5)
        while len(inbox.messages) < 20:
            sub.ack(sub.connection, [m[2] for m in inbox.messages])
            await asyncio.sleep(0.05)
        assert inbox.payloads == [b"%d" % i for i in range(20)]


async def test_what_was_not_acknowledged_comes_again_on_the_next_connection(broker, users) -> None:
    topic = f"{ROOT}/{uuid.uuid4().hex[:8]}/#"
    client_id = f"again-{uuid.uuid4().hex[:8]}"
    first = Inbox()
    async with subscribed(broker, users, first, client_id, topic) as sub:
        await publish(broker, users, topic.replace("#", "r"), [b"a", b"b", b"c", b"d"])
        await until(lambda: len(first.messages) == 4)
        # a and b are stored and acknowledged; c and d were not when the connection ended.
        sub.ack(sub.connection, [m[2] for m in first.messages[:2]])
        await asyncio.sleep(0.2)
    second = Inbox()
    async with subscribed(broker, users, second, client_id, topic):
        await until(lambda: len(second.messages) >= 2)
        await asyncio.sleep(0.3)
        assert second.payloads == [b"c", b"d"]


async def test_acks_of_a_lost_connection_are_not_sent_on_the_next(broker, users) -> None:
    topic = f"{ROOT}/{uuid.uuid4().hex[:8]}/#"
    inbox = Inbox()
    async with subscribed(broker, users, inbox, f"old-{uuid.uuid4().hex[:8]}", topic) as sub:
        assert sub.ack(sub.connection - 1, [1, 2, 3]) == 0


async def test_large_payloads_split_across_reads_arrive_whole(broker, users) -> None:
    topic = f"{ROOT}/{uuid.uuid4().hex[:8]}/#"
    inbox = Inbox()
    # The broker takes no packet over 64 KiB: sixteen of 60 KB published at once make a
    # burst of about 1 MB that the socket hands over in reads of up to 256 KiB, whose ends
    # fall inside messages.
    big = [bytes([index]) + bytes(range(256)) * 240 for index in range(16)]
    async with subscribed(broker, users, inbox, f"big-{uuid.uuid4().hex[:8]}", topic):
        async with aiomqtt.Client(
            broker.host, broker.port, username=users[0], password=users[1]
        ) as client:
            await asyncio.gather(
                *(client.publish(topic.replace("#", "r"), payload, qos=1) for payload in big)
            )
        await until(lambda: len(inbox.messages) == 16)
        assert sorted(inbox.payloads) == sorted(big)
        assert inbox.messages[0][0] == topic.replace("#", "r")


def subscriber_as(
    broker: EmbeddedMosquitto, user: str, password: str, topic_filter: str
) -> MqttSubscriber:
    options = SubscriberOptions(
        host=broker.host,
        port=broker.port,
        client_id=f"refused-{uuid.uuid4().hex[:8]}",
        username=user,
        password=password,
        filters=(topic_filter,),
    )
    return MqttSubscriber(options, Inbox())


async def test_a_wrong_password_is_a_clear_error(broker, users) -> None:
    subscriber = subscriber_as(broker, users[0], "not-the-password", f"{ROOT}/#")
    with pytest.raises(MqttSubscriberError, match=r"not authorized|bad user name"):
        await subscriber.run()


async def test_a_filter_beyond_the_acl_is_refused(broker, users) -> None:
    subscriber = subscriber_as(broker, users[0], users[1], "someone-else/#")
    with pytest.raises(MqttSubscriberError, match="subscription refused"):
        await subscriber.run()


async def test_no_broker_is_a_clear_error(broker) -> None:
    from libs.servers.ports import free_port

    subscriber = MqttSubscriber(
        SubscriberOptions(host="127.0.0.1", port=free_port(), client_id="nobody"), Inbox()
    )
    with pytest.raises(MqttSubscriberError, match="cannot reach the broker"):
        await subscriber.run(connect_timeout=2)


def publish_packet(topic: str, payload: bytes, packet_id: int, qos: int = 1) -> bytes:
    """A PUBLISH as a broker sends it (MQTT 5, no properties)."""
    body = len(topic).to_bytes(2, "big") + topic.encode()
    if qos:
        body += packet_id.to_bytes(2, "big")
    body += b"\x00" + payload
    size, length = len(body), bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        length.append(byte | (0x80 if size else 0))
        if not size:
            break
    return bytes([0x30 | qos << 1]) + bytes(length) + body


async def test_the_parser_takes_split_packets_and_stops_at_a_broken_stream() -> None:
    """The subscriber's protocol over a real socket pair, fed bytes a broker could send: a
    packet split across reads arrives whole; QoS 2 (never asked for) and a packet over the
    maximum size end the connection, and nothing after them is delivered."""
    loop = asyncio.get_running_loop()
    for bad in (
        publish_packet("t/x", b"qos two", 7, qos=2),
        b"\x30\xff\xff\xff\x7f",  # a remaining length of 256 MiB
    ):
        inbox = Inbox()
        ours, theirs = socket.socketpair()
        _, protocol = await loop.connect_accepted_socket(
            lambda inbox=inbox: _Protocol(inbox, lambda *_: None, 1 << 20), ours
        )
        first = publish_packet("t/a", b"x" * 3000, 1)
        theirs.sendall(first[:1500])
        await asyncio.sleep(0.05)
        assert inbox.messages == []
        theirs.sendall(first[1500:] + bad + publish_packet("t/b", b"after", 2))
        reason = await asyncio.wait_for(protocol.closed, 5)
        assert inbox.messages == [("t/a", b"x" * 3000, 1)]
        assert isinstance(reason, MqttSubscriberError)
        theirs.close()
