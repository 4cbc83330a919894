"""A TCP proxy for fault tests: latency, stalled (half-open) connections, resets mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct


class FaultyProxy:
    """Forwards 127.0.0.1:port to a target; faults are switched on and off while it runs."""

    def __init__(self, target_port: int) -> None:
        """A proxy to 127.0.0.1:``target_port``; ``start`` picks its own port."""
        self.target_port = target_port
        self.port = 0
        self.latency = 0.0
        self.reset_after_bytes: int | None = None  # downstream bytes per connection before a reset
        self._stalled: set[asyncio.StreamWriter] = set()
        # Holding: every connection stalls, those opened meanwhile too (a Redis that stops answering).
        self._holding = False
        self._released = asyncio.Event()
        self._connections: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._server: asyncio.Server | None = None
        self.resets = 0

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listener and every connection."""
        if self._server is not None:
            self._server.close()
        for pair in list(self._connections):
            for writer in pair:
                writer.close()

    def stall(self) -> None:
        """Stop moving bytes on every open connection, leaving them open (half-open peers)."""
        self._stalled = {w for pair in self._connections for w in pair}
        self._released.clear()

    def hold(self) -> None:
        """Stop moving bytes on every connection, open now or opened while held (the bytes wait, none is lost)."""
        self._holding = True
        self._released.clear()

    def unstall(self) -> None:
        """Move bytes again; connections opened since ``stall`` were never stalled."""
        self._stalled = set()
        self._holding = False
        self._released.set()

    def reset_all(self) -> None:
        """Reset (RST) every open connection."""
        for pair in list(self._connections):
            self._reset(pair)

    def _reset(self, pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        self._connections.discard(pair)
        self.resets += 1
        for writer in pair:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        pair = (client_writer, upstream_writer)
        self._connections.add(pair)
        await asyncio.gather(
            self._pump(client_reader, upstream_writer, pair, downstream=False),
            self._pump(upstream_reader, client_writer, pair, downstream=True),
            return_exceptions=True,
        )
        self._connections.discard(pair)
        for writer in pair:
            writer.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        *,
        downstream: bool,
    ) -> None:
        sent = 0
        while data := await reader.read(65_536):
            if self._holding or writer in self._stalled:
                await self._released.wait()
            if self.latency:
                await asyncio.sleep(self.latency)  # wait-ok: the latency is the fault
            if downstream and self.reset_after_bytes is not None and sent + len(data) > self.reset_after_bytes:
                writer.write(data[: max(0, self.reset_after_bytes - sent)])
                self._reset(pair)
                return
            sent += len(data)
            writer.write(data)
            await writer.drain()
        writer.close()
