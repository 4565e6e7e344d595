"""Connections to upstream servers, verified and reused.

Upstream TLS is verified against the host's system bundle plus the policy's
``upstreams.extra_ca``, with the name the sandbox asked for as SNI and as the
name to verify, whatever address it was resolved or mapped to. Connections are
kept alive and reused per (scheme, name, address, port, CA bundle), which is
what keeps an intercepted request within a millisecond or two of a direct one.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import h11

from corral.security.proxy.streams import HttpStream

__all__ = ["UpstreamError", "UpstreamKey", "UpstreamPool"]

CONNECT_TIMEOUT = 10.0
#: TLS bytes decrypted per read on upstream connections (asyncio's own default)
UPSTREAM_TLS_READ = 256 * 1024
#: idle connections kept per key, and how long
MAX_IDLE_PER_KEY = 64
IDLE_SECONDS = 60.0


class UpstreamError(Exception):
    """The upstream could not be reached; the message is written for the agent."""


@dataclass(frozen=True)
class UpstreamKey:
    scheme: str
    host: str  # the name: SNI and certificate check
    addr: str  # where to connect
    port: int
    extra_ca: str | None = None


class UpstreamPool:
    """Idle keep-alive connections, per ``UpstreamKey``."""

    def __init__(self) -> None:
        self._idle: defaultdict[UpstreamKey, deque[tuple[float, HttpStream]]] = \
            defaultdict(deque)
        self._contexts: dict[str | None, ssl.SSLContext] = {}

    def tls_context(self, extra_ca: str | None) -> ssl.SSLContext:
        ctx = self._contexts.get(extra_ca)
        if ctx is None:
            ctx = ssl.create_default_context()
            if extra_ca:
                ctx.load_verify_locations(cafile=extra_ca)
            ctx.set_alpn_protocols(["http/1.1"])
            self._contexts[extra_ca] = ctx
        return ctx

    def forget_context(self, extra_ca: str | None) -> None:
        """Drop a cached context (the CA file changed)."""
        self._contexts.pop(extra_ca, None)

    async def get(self, key: UpstreamKey) -> tuple[HttpStream, bool]:
        """A connection for ``key`` -> (stream, reused). Raises ``UpstreamError``."""
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            at, stream = idle.pop()
            if now - at < IDLE_SECONDS and not stream.reader.at_eof() \
                    and not stream.writer.is_closing():
                return stream, True
            stream.close()
        return await self._connect(key), False

    async def _connect(self, key: UpstreamKey) -> HttpStream:
        ctx = None
        if key.scheme == "https":
            if key.extra_ca and not Path(key.extra_ca).is_file():
                raise UpstreamError(f"the policy's upstreams.extra_ca {key.extra_ca} is missing")
            ctx = self.tls_context(key.extra_ca)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    key.addr, key.port, ssl=ctx,
                    server_hostname=key.host if ctx is not None else None,
                    limit=256 * 1024)
        except ssl.SSLCertVerificationError as exc:
            raise UpstreamError(f"the certificate of {key.host} ({key.addr}:{key.port}) "
                                f"failed verification: {exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise UpstreamError(f"TLS with {key.host} ({key.addr}:{key.port}) failed: "
                                f"{exc.reason or exc}") from None
        except TimeoutError:
            raise UpstreamError(f"connecting to {key.host} ({key.addr}:{key.port}) timed "
                                "out") from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {key.host} ({key.addr}:{key.port}): "
                                f"{exc.strerror or exc}") from None
        return HttpStream(h11.CLIENT, reader, writer, tls_read_size=UPSTREAM_TLS_READ)

    def put(self, key: UpstreamKey, stream: HttpStream) -> None:
        """Give a connection back after a complete exchange (closed if it cannot be reused)."""
        if not stream.reusable or stream.writer.is_closing():
            stream.close()
            return
        if stream.conn.our_state is h11.DONE:
            try:
                stream.conn.start_next_cycle()
            except h11.LocalProtocolError:
                stream.close()
                return
        stream.fresh_done()
        idle = self._idle[key]
        idle.append((time.monotonic(), stream))
        while len(idle) > MAX_IDLE_PER_KEY:
            idle.popleft()[1].close()

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for _, stream in idle:
                stream.close()
        self._idle.clear()
        await asyncio.sleep(0)
