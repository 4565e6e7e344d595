"""h11 over asyncio streams, and the socket plumbing the listeners share."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Any

import h11

__all__ = ["HttpStream", "open_accepted", "peek", "wait_readable"]

#: bytes read per call: large reads keep big downloads cheap
READ_SIZE = 256 * 1024
#: bytes queued towards a peer before the proxy waits for it to read
WRITE_BUFFER = 1024 * 1024
#: a request or response head larger than this is refused
MAX_HEAD = 64 * 1024


class HttpStream:
    """One side of the proxy (the sandbox's client, or an upstream server) spoken to
    through an h11 state machine."""

    __slots__ = ("_fresh", "_out", "conn", "reader", "writer")

    def __init__(self, role: type[h11.CLIENT] | type[h11.SERVER],
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 tls_read_size: int | None = None) -> None:
        self.conn = h11.Connection(role, max_incomplete_event_size=MAX_HEAD)
        self.reader = reader
        self.writer = writer
        self._fresh = False
        self._out: list[bytes] = []
        # a deeper write buffer than asyncio's 64 KiB keeps both sides of a large body
        # moving instead of taking turns
        with contextlib.suppress(AttributeError, NotImplementedError):
            writer.transport.set_write_buffer_limits(high=WRITE_BUFFER)
        if tls_read_size:
            # the daemon keeps asyncio's per-connection TLS read buffer small (many idle
            # client connections); upstream connections carry the big bodies
            proto = getattr(writer.transport, "_ssl_protocol", None)
            if proto is not None:
                proto.max_size = tls_read_size

    async def next_event(self, timeout: float | None = None) -> Any:
        """The next h11 event, reading as needed. Raises ``TimeoutError``,
        ``h11.RemoteProtocolError`` and ``OSError``."""
        conn = self.conn
        while True:
            ev = conn.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            if timeout is None:
                data = await self.reader.read(READ_SIZE)
            else:
                async with asyncio.timeout(timeout):
                    data = await self.reader.read(READ_SIZE)
            conn.receive_data(data)

    def reset(self) -> None:
        """Start over with a fresh state machine (after the proxy finished an exchange
        on its own); ``reusable`` is then true."""
        self.conn = h11.Connection(self.conn.our_role, max_incomplete_event_size=MAX_HEAD)
        self._fresh = True

    def fresh_done(self) -> None:
        """The fresh state machine is in use again (the pool handed it out)."""
        self._fresh = False

    def send(self, event: Any) -> None:
        """Queue an event's bytes; ``flush`` or ``drain`` writes them (a response head
        and a small body then leave in one TLS record and one syscall)."""
        data = self.conn.send(event)
        if data:
            self._out.append(data)

    def flush(self) -> None:
        out = self._out
        if out:
            self.writer.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    async def drain(self) -> None:
        """Write what is queued and wait while the peer is slow to read."""
        self.flush()
        await self.writer.drain()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    @property
    def reusable(self) -> bool:
        """Both directions finished one exchange and may start another."""
        if self._fresh:
            return self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE


async def wait_readable(sock: socket.socket, timeout: float) -> bool:
    """Wait until ``sock`` has data (or EOF); False on timeout."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        async with asyncio.timeout(timeout):
            await fut
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


async def peek(sock: socket.socket, n: int, timeout: float) -> bytes:
    """Up to ``n`` bytes the peer sent first, left unread (b"" on EOF or timeout)."""
    if not await wait_readable(sock, timeout):
        return b""
    try:
        return sock.recv(n, socket.MSG_PEEK)
    except (BlockingIOError, OSError):
        return b""


async def open_accepted(sock: socket.socket, ssl_context: ssl.SSLContext | None = None,
                        handshake_timeout: float = 10.0
                        ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams over an accepted socket, as the server side of TLS when given a context."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_HEAD, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await loop.connect_accepted_socket(
        lambda: protocol, sock, ssl=ssl_context,
        ssl_handshake_timeout=handshake_timeout if ssl_context else None)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer
