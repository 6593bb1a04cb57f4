"""A TCP relay between a NATS client and the real server, to hold back or cut its traffic.

It forwards bytes unchanged; it only lets a test say *when* the network misbehaves: hold what
the server sends (a stall, as a slow network or a paused server makes), or cut the connection
just as the server delivers a chosen message (the client reconnects through the relay).
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

from libs.servers.ports import free_port


class TcpRelay:
    """Relays ``127.0.0.1:<port>`` to the server of ``upstream_url``."""

    def __init__(self, upstream_url: str) -> None:
        first = urlsplit(upstream_url.split(",")[0].strip())
        self._upstream = (first.hostname or "127.0.0.1", first.port or 4222)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._cut_marker: bytes | None = None
        self._cut_client_marker: bytes | None = None
        self._swallow_client_marker: bytes | None = None
        self._client_gate: bytes | None = None
        self.swallowed = asyncio.Event()
        self.cut = asyncio.Event()
        self._watch: tuple[bytes, asyncio.Event] | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._down = False

    @property
    def url(self) -> str:
        """The URL a client connects to instead of the server's."""
        return f"nats://127.0.0.1:{self.port}"

    async def __aenter__(self) -> TcpRelay:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    def go_down(self) -> None:
        """Cut every connection and refuse new ones, as a server that is gone would."""
        self._down = True
        for writer in list(self._writers):
            writer.transport.abort()

    def come_back(self) -> None:
        """Accept connections again."""
        self._down = False

    def hold(self) -> None:
        """Keep back everything the server sends from now on, until ``release``."""
        self._flowing.clear()

    def release(self) -> None:
        """Deliver what was held back, in order, and stop holding."""
        self._flowing.set()

    def cut_at(self, marker: bytes) -> None:
        """Drop the server's next data containing ``marker`` and cut that connection."""
        self.cut.clear()
        self._cut_marker = marker

    def cut_client_at(self, marker: bytes, *, after: bytes | None = None) -> None:
        """Drop the client's next data containing ``marker`` and cut that connection: what it
        sent never reaches the server (a connection lost just as a request went out).

        With ``after``, only on the connection that sent ``after`` first, from its next data
        on: the relay arms itself, so no data can slip through while a test reacts."""
        self.cut.clear()
        self._cut_client_marker = marker
        self._client_gate = after

    def swallow_client_at(self, marker: bytes, *, after: bytes | None = None) -> None:
        """Drop the client's next data containing ``marker`` and keep the connection: the
        client waits for an answer that never comes (a process frozen just as it sent it).
        ``after`` as for ``cut_client_at``."""
        self.swallowed.clear()
        self._swallow_client_marker = marker
        self._client_gate = after

    def watch_client(self, marker: bytes) -> asyncio.Event:
        """An event set once the client sends data containing ``marker`` (from now on)."""
        seen = asyncio.Event()
        self._watch = (marker, seen)
        return seen

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self._down:
            client_w.transport.abort()
            return
        server_r, server_w = await asyncio.open_connection(*self._upstream)
        self._writers |= {client_w, server_w}
        pair = (client_w, server_w)
        try:
            await asyncio.gather(
                self._pump(client_r, server_w, pair, downstream=False),
                self._pump(server_r, client_w, pair, downstream=True),
            )
        finally:
            self._writers -= {client_w, server_w}

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        *,
        downstream: bool,
    ) -> None:
        tail = b""
        gate_passed = False
        try:
            while data := await reader.read(65536):
                window, tail = tail + data, data[-200:]
                gate = self._client_gate
                armed = gate is None or gate_passed
                if not downstream and not armed and gate is not None and gate in window:
                    gate_passed, tail = True, b""
                if downstream:
                    if self._cut_marker is not None and self._cut_marker in window:
                        self._cut_marker = None
                        for w in pair:
                            w.transport.abort()
                        self.cut.set()
                        return
                    await self._flowing.wait()
                elif (
                    armed
                    and self._cut_client_marker is not None
                    and self._cut_client_marker in window
                ):
                    self._cut_client_marker = self._client_gate = None
                    for w in pair:
                        w.transport.abort()
                    self.cut.set()
                    return
                elif (
                    armed
                    and self._swallow_client_marker is not None
                    and self._swallow_client_marker in window
                ):
                    self._swallow_client_marker = self._client_gate = None
                    self.swallowed.set()
                    continue
                elif self._watch is not None and self._watch[0] in window:
                    self._watch[1].set()
                    self._watch = None
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                writer.close()
