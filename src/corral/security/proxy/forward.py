"""Forwarding one checked request upstream and streaming the response back.

What goes upstream is rebuilt from the checked request (method, canonical
target after the secret swap, the checked headers minus hop-by-hop ones), never
the bytes the sandbox sent. Responses stream through: real secret values are
scrubbed out (which can change a body's length, so a scrubbed response loses its
Content-Length and goes out chunked), model API usage is metered, and a 101
switches the connection to a raw two-way pipe (WebSocket).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import h11

from corral.security.proxy.streams import READ_SIZE, WRITE_BUFFER, HttpStream
from corral.security.proxy.upstream import UpstreamError, UpstreamKey

if TYPE_CHECKING:
    from corral.security.proxy.services import Services
    from corral.security.types import Scrubber, UsageParser

#: (content type, content encoding) of a response -> a usage parser for its body
MeterFactory = Callable[[str | None, str | None], "UsageParser | None"]

__all__ = ["Outcome", "Plan", "forward"]

#: the upstream's response head must start within this many seconds
RESPONSE_TIMEOUT = 300.0
#: no byte in either direction for this long ends a body
BODY_TIMEOUT = 300.0

_HOP_REQUEST = frozenset({"connection", "proxy-connection", "keep-alive", "proxy-authorization",
                          "proxy-authenticate", "te", "trailer", "upgrade", "expect"})
_HOP_RESPONSE = frozenset({"connection", "proxy-connection", "keep-alive", "te", "trailer",
                           "upgrade", "transfer-encoding", "proxy-authenticate"})


@dataclass
class Plan:
    """Everything decided about one request before it goes upstream."""

    key: UpstreamKey
    method: str
    target: str
    headers: Sequence[tuple[str, str]]
    #: body bytes the proxy already read (a git push's command list)
    prefix: bytes = b""
    #: the request body was read to its end already
    body_done: bool = False
    websocket: bool = False
    #: ask upstream for an uncompressed body (to scrub or meter it)
    identity: bool = False
    scrubber: Scrubber | None = None
    #: scrubs response header values (the broker's ``scrub_text``)
    scrub_text: Callable[[str], str] | None = None
    meter: MeterFactory | None = None


@dataclass
class Outcome:
    status: int = 0
    sent: int = 0
    #: the client connection may carry another request
    keep_alive: bool = True
    upgraded: bool = False
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def request_headers(plan: Plan) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for k, v in plan.headers:
        low = k.lower()
        if low in _HOP_REQUEST:
            continue
        if plan.identity and low == "accept-encoding":
            continue
        out.append((k, v))
    if plan.identity:
        out.append(("Accept-Encoding", "identity"))
    if plan.websocket:
        out += [("Connection", "Upgrade"), ("Upgrade", "websocket")]
    return out


def response_headers(resp: h11.Response, scrub: Callable[[str], str] | None,
                     drop_length: bool) -> list[tuple[bytes, bytes]]:
    out = []
    for k, v in resp.headers:
        low = k.decode("latin-1").lower()
        if low in _HOP_RESPONSE:
            continue
        if drop_length and low == "content-length":
            continue
        out.append((k, scrub(v.decode("latin-1")).encode("latin-1") if scrub else v))
    return out


async def forward(client: HttpStream, svc: Services, plan: Plan) -> Outcome:
    """Send ``plan`` upstream and stream the answer to ``client``.

    Raises ``UpstreamError`` when nothing was sent to the client yet (the caller
    answers 502); later failures just end the client connection."""
    request = h11.Request(method=plan.method, target=plan.target,
                          headers=request_headers(plan))
    replayable = plan.body_done or not _has_body(plan)
    for attempt in (1, 2):
        up, reused = await svc.pool.get(plan.key)
        try:
            await _send_request(client, up, request, plan)
            ev = await up.next_event(timeout=RESPONSE_TIMEOUT)
            break
        except UpstreamError:
            up.close()
            raise
        except (OSError, h11.ProtocolError, asyncio.IncompleteReadError) as exc:
            up.close()
            # a kept-alive connection the upstream closed meanwhile: try a fresh one once
            if reused and replayable and attempt == 1:
                continue
            raise UpstreamError(f"{plan.key.host} broke the connection: "
                                f"{exc.__class__.__name__}: {exc}") from None
        except TimeoutError:
            up.close()
            raise UpstreamError(f"{plan.key.host} did not answer within "
                                f"{RESPONSE_TIMEOUT:g}s") from None
    try:
        return await _relay(client, up, svc, plan, ev)
    finally:
        if up.reusable and not client.writer.is_closing():
            svc.pool.put(plan.key, up)
        else:
            up.close()


def _has_body(plan: Plan) -> bool:
    for k, v in plan.headers:
        low = k.lower()
        if low == "transfer-encoding" or (low == "content-length" and v.strip() != "0"):
            return True
    return False


async def _send_request(client: HttpStream, up: HttpStream, request: h11.Request,
                        plan: Plan) -> None:
    up.send(request)
    if plan.prefix:
        up.send(h11.Data(data=plan.prefix))
    if not plan.body_done:
        if client.conn.they_are_waiting_for_100_continue:
            client.send(h11.InformationalResponse(status_code=100, headers=[]))
            await client.drain()
        while True:
            ev = await client.next_event(timeout=BODY_TIMEOUT)
            if isinstance(ev, h11.Data):
                up.send(ev)
                await up.drain()
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:
                raise OSError("the client went away in the middle of the request body")
        plan.body_done = True
        plan.prefix = b""
    up.send(h11.EndOfMessage())
    await up.drain()


async def _relay(client: HttpStream, up: HttpStream, svc: Services, plan: Plan,
                 ev: Any) -> Outcome:
    out = Outcome()
    while isinstance(ev, h11.InformationalResponse):
        if ev.status_code == 101 and plan.websocket:
            return await _upgrade(client, up, ev, out)
        ev = await up.next_event(timeout=RESPONSE_TIMEOUT)
    if not isinstance(ev, h11.Response):
        raise UpstreamError("the upstream closed the connection without a response")
    scrubber = plan.scrubber
    out.status = ev.status_code
    client.send(h11.Response(status_code=ev.status_code, reason=ev.reason,
                             headers=response_headers(ev, plan.scrub_text,
                                                      scrubber is not None)))
    meter = None
    if plan.meter is not None:
        meter = plan.meter(_header(ev.headers, b"content-type"),
                           _header(ev.headers, b"content-encoding"))
        out.extra["meter"] = meter
    length = _plain_length(ev, plan)
    if length is not None and meter is None and scrubber is None:
        return await _copy_body(client, up, ev, length, out)
    while True:
        try:
            ev = await up.next_event(timeout=BODY_TIMEOUT)
        except (OSError, h11.ProtocolError, TimeoutError) as exc:
            out.error = f"upstream body: {exc}"
            out.keep_alive = False
            client.close()
            return out
        if isinstance(ev, h11.Data):
            data = ev.data
            if meter is not None:
                meter.feed(data)
            if scrubber is not None:
                data = scrubber.feed(data)
            if data:
                client.send(h11.Data(data=data))
                out.sent += len(data)
                await client.drain()
        elif isinstance(ev, h11.EndOfMessage):
            if scrubber is not None:
                tail = scrubber.flush()
                if tail:
                    client.send(h11.Data(data=tail))
                    out.sent += len(tail)
            client.send(h11.EndOfMessage())
            await client.drain()
            return out
        else:
            out.keep_alive = False
            client.close()
            return out


def _plain_length(resp: h11.Response, plan: Plan) -> int | None:
    """The Content-Length of a response body the proxy only passes through (nothing to
    scrub or meter, no chunking), else None."""
    if plan.method == "HEAD" or resp.status_code in (204, 304):
        return None
    cl = _header(resp.headers, b"content-length")
    if cl is None or _header(resp.headers, b"transfer-encoding") is not None:
        return None
    try:
        return int(cl)
    except ValueError:
        return None


async def _copy_body(client: HttpStream, up: HttpStream, resp: h11.Response, length: int,
                     out: Outcome) -> Outcome:
    """Pass a Content-Length body through without parsing it a second time.

    What h11 already buffered is taken as events; the rest is read straight from the
    upstream stream (h11 adds two copies per chunk, which is a third of the proxy's
    work on a large download). The upstream's state machine is then replaced by a
    fresh one, which is exactly the state after a complete exchange."""
    left = length
    while left > 0:
        ev = up.conn.next_event()
        if ev is h11.NEED_DATA:
            break
        if isinstance(ev, h11.Data):
            client.send(ev)
            left -= len(ev.data)
        elif isinstance(ev, h11.EndOfMessage):
            break
    try:
        if left > 0:
            await _pump(client, up, left)
    except (OSError, TimeoutError) as exc:
        out.error = f"upstream body: {exc}"
        out.keep_alive = False
        client.close()
        up.close()
        return out
    out.sent = length
    client.send(h11.EndOfMessage())
    await client.drain()
    if up.conn.their_state is h11.SEND_BODY:  # we read the body past h11
        keep = resp.http_version == b"1.1" and b"close" not in (
            _header(resp.headers, b"connection") or "").lower().encode()
        if keep and up.conn.our_state is h11.DONE:
            up.reset()
        else:
            up.close()
    return out


class _BodyPump(asyncio.BufferedProtocol):
    """Takes the upstream's decrypted body straight from its TLS transport into one
    reused buffer and hands each piece to the client: no per-record objects, no
    stream-reader buffer (two to four copies of every byte fewer than reading it)."""

    def __init__(self, client: HttpStream, upstream: asyncio.BaseTransport, left: int) -> None:
        self.client = client
        self.upstream = upstream
        self.left = left
        self.buf = memoryview(bytearray(READ_SIZE))
        self.extra = b""
        self.error: Exception | None = None
        self.paused = False
        self._wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        take = min(nbytes, self.left)
        self.client.send(h11.Data(data=bytes(self.buf[:take])))
        self.client.flush()
        self.left -= take
        if take < nbytes:  # bytes after the body (a misbehaving upstream): kept for h11
            self.extra += bytes(self.buf[take:nbytes])
        if self.left == 0:
            self._signal()
        elif self.client.writer.transport.get_write_buffer_size() > WRITE_BUFFER:
            self.upstream.pause_reading()  # type: ignore[attr-defined]
            self.paused = True
            self._signal()

    def eof_received(self) -> bool | None:
        self.error = OSError("the upstream closed the connection in the middle of the body")
        self._signal()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = exc or OSError("the upstream connection was lost in the body")
        self._signal()

    def _signal(self) -> None:
        if not self._wake.done():
            self._wake.set_result(None)

    async def wait(self) -> None:
        async with asyncio.timeout(BODY_TIMEOUT):
            await self._wake
        self._wake = asyncio.get_running_loop().create_future()


async def _pump(client: HttpStream, up: HttpStream, left: int) -> None:
    """Copy ``left`` body bytes from ``up`` to ``client``. Raises OSError, TimeoutError."""
    reader, transport = up.reader, up.writer.transport
    # what the stream reader already holds comes first (its buffer has no public view)
    held = getattr(reader, "_buffer", None)
    if held:
        chunk = bytes(held[:left])
        del held[:len(chunk)]
        client.send(h11.Data(data=chunk))
        left -= len(chunk)
        await client.drain()
    if left == 0:
        return
    original = transport.get_protocol()
    pump = _BodyPump(client, transport, left)
    transport.set_protocol(pump)
    transport.resume_reading()  # type: ignore[attr-defined]
    try:
        while pump.left > 0 and pump.error is None:
            await pump.wait()
            if pump.paused:
                await client.writer.drain()
                pump.paused = False
                transport.resume_reading()  # type: ignore[attr-defined]
    finally:
        transport.set_protocol(original)
    if pump.error is not None and pump.left > 0:
        raise OSError(str(pump.error))
    if pump.extra:
        reader.feed_data(pump.extra)
    await client.drain()


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    for k, v in headers:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


async def _upgrade(client: HttpStream, up: HttpStream, resp: h11.InformationalResponse,
                   out: Outcome) -> Outcome:
    """After a 101: tell the client, then copy bytes both ways until either side ends."""
    headers = [(k, v) for k, v in resp.headers
               if k.lower() not in (b"proxy-connection", b"keep-alive")]
    client.send(h11.InformationalResponse(status_code=101, headers=headers,
                                          reason=resp.reason))
    client.flush()
    out.status, out.upgraded, out.keep_alive = 101, True, False
    c_extra, _ = client.conn.trailing_data
    u_extra, _ = up.conn.trailing_data
    if c_extra:
        up.writer.write(c_extra)
    if u_extra:
        client.writer.write(u_extra)
    await asyncio.gather(_pipe(client.reader, up.writer), _pipe(up.reader, client.writer))
    up.close()
    client.close()
    return out


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(256 * 1024)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (OSError, ConnectionError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
