"""One connection from a sandbox: its HTTP/1.1 requests, checked one by one.

For each request, in this order: canonical form and ambiguity checks
(``canon.check_request``; the CONNECT target, SNI or transparent destination
must agree with the Host), a git push's ref updates, the policy's decision
(an ``ask`` holds the live request until a human decides), the model-call
limit, the secret swap (a sentinel headed to an unbound host blocks the
request), the upstream address check (no loopback, link-local or private
address unless a rule names it), then forwarding. Every denial is a 403 whose
body is the reason, written for the agent; every decision is audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import ipaddress
import logging
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any, Literal

import h11

from corral.security import canon, gitproto, metering
from corral.security.proxy.forward import Plan, forward
from corral.security.proxy.streams import HttpStream
from corral.security.proxy.upstream import UpstreamError, UpstreamKey
from corral.security.types import Decision, RefUpdate, RequestView

if TYPE_CHECKING:
    from corral.security.engine import Engine
    from corral.security.proxy.attachment import Attachment
    from corral.security.proxy.services import Services

__all__ = ["Session"]

log = logging.getLogger("corral.security.proxy")

#: a kept-alive client connection with no request for this long is closed
IDLE_TIMEOUT = 600.0
#: a request head must arrive within this many seconds once begun
HEAD_TIMEOUT = 60.0
#: request body bytes read and thrown away after a denial before closing instead
DRAIN_LIMIT = 1 << 20
TLS_HANDSHAKE_TIMEOUT = 10.0


class Deny(Exception):
    """Answer the current request with ``status`` and ``reason`` and audit it."""

    def __init__(self, status: int, reason: str, event: str = "request.denied", *,
                 close: bool = False, **details: object) -> None:
        super().__init__(reason)
        self.close = close
        self.status = status
        self.reason = reason
        self.event = event
        self.details: dict[str, Any] = dict(details)


class Session:
    """Serves one client connection of one sandbox."""

    def __init__(self, att: Attachment, svc: Services, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, *, scheme: Literal["http", "https"] = "http",
                 authority: tuple[str, int] | None = None, problem: str | None = None,
                 mode: str = "proxy") -> None:
        self.att = att
        self.svc = svc
        self.client = HttpStream(h11.SERVER, reader, writer)
        self.scheme: Literal["http", "https"] = scheme
        #: the destination fixed by the connection (CONNECT target, transparent dst)
        self.authority = authority
        #: a reason every request on this connection is denied (SNI mismatch ...)
        self.problem = problem
        self.mode = mode
        self.served = 0

    # -- the request loop ----------------------------------------------------------
    async def run(self) -> None:
        try:
            while True:
                try:
                    ev = await self.client.next_event(
                        timeout=IDLE_TIMEOUT if self.served else HEAD_TIMEOUT)
                except TimeoutError:
                    return
                except h11.RemoteProtocolError as exc:
                    await self._plain_error(400, f"corral proxy: malformed HTTP request "
                                                 f"({exc})")
                    return
                if not isinstance(ev, h11.Request):
                    return
                self.served += 1
                keep = await self._request(ev)
                if keep and self.client.conn.our_state is h11.IDLE:
                    continue  # a CONNECT turned this into a fresh TLS connection
                if not keep or not self.client.reusable:
                    return
                self.client.conn.start_next_cycle()
        except (OSError, asyncio.IncompleteReadError, h11.ProtocolError, ssl.SSLError) as exc:
            log.debug("client connection of %s ended: %r", self.att.sandbox_id, exc)
        finally:
            self.client.close()

    async def _request(self, req: h11.Request) -> bool:
        method = req.method.decode("latin-1").upper()
        if method == "CONNECT":
            return await self._connect(req)
        try:
            return await self._exchange(req)
        except Deny as d:
            return await self._deny(d, req)

    # -- CONNECT -------------------------------------------------------------------
    async def _connect(self, req: h11.Request) -> bool:
        target = req.target.decode("latin-1")
        if self.authority is not None or self.served > 1:
            return await self._deny(Deny(405, "CONNECT is only accepted as the first "
                                         "request on a connection to the proxy"), req)
        try:
            host, port = canon.check_connect(target)
        except canon.InvalidHost as exc:
            return await self._deny(Deny(400, f"bad CONNECT target: {exc}"), req)
        self.client.send(h11.Response(status_code=200, headers=[], reason=b"Connection "
                                      b"established"))
        await self.client.drain()
        extra, _ = self.client.conn.trailing_data
        if extra:
            # bytes sent before our 200 would be read as plaintext; no real client does it
            self.client.close()
            return False
        expected = host
        ctx = self.att.ca.server_context(expected)
        try:
            await self.client.writer.start_tls(ctx, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            log.debug("TLS inside CONNECT %s failed: %r", target, exc)
            # not TLS (ssh, raw TCP ...): nothing reaches any upstream
            self.svc.audit.emit("request.denied", sandbox=self.att.sandbox_id,
                                task=self.att.task_id, method="CONNECT", url=target,
                                reason=f"not TLS inside CONNECT ({_short(exc)}); only HTTPS "
                                       "may go through the proxy's tunnels")
            self.client.close()
            return False
        sni = _sni_of(self.client.writer)
        self.client = HttpStream(h11.SERVER, self.client.reader, self.client.writer)
        self.scheme, self.authority = "https", (host, port)
        self.problem = _sni_problem(sni, host, "the CONNECT target")
        self.served = 0
        return True

    # -- one request ---------------------------------------------------------------
    async def _exchange(self, req: h11.Request) -> bool:
        att, svc = self.att, self.svc
        engine = att.engine
        if self.authority is None and not req.target[:8].lower().startswith(
                (b"http://", b"https://")):
            raise Deny(400, "this is corral's egress proxy: send requests in absolute form "
                            "(http://host/path) or tunnel HTTPS with CONNECT")
        if self.problem:
            raise Deny(403, self.problem, kind="fronting")
        checked = canon.check_request(
            req.method, req.target, req.headers, scheme=self.scheme, authority=self.authority,
            http_version=req.http_version.decode("latin-1"), relax=engine.path_relaxations)
        if isinstance(checked, canon.Rejected):
            # where this request ends is in doubt: nothing after it on this connection is
            # read either
            raise Deny(403, f"corral: request refused: {checked.reason}.", close=True,
                       kind="ambiguous")
        prefix, body_done = b"", checked.body == "none"
        if body_done:
            # h11 still owes the request's EndOfMessage; take it so the connection can
            # carry the next request
            ev = await self.client.next_event(timeout=HEAD_TIMEOUT)
            if not isinstance(ev, h11.EndOfMessage):
                raise Deny(400, "corral: a request without a body carried one", close=True)
        updates: tuple[RefUpdate, ...] = ()
        if gitproto.is_receive_pack_request(checked.method, checked.path) and not body_done:
            prefix, body_done, updates = await self._read_push(checked)
        view = checked.view(att.sandbox_id, task_id=att.task_id, git_updates=updates)
        decision = engine.decide(view)
        if decision.action == "ask":
            decision = await self._hold(view, decision, engine)
        if not decision.allowed:
            raise Deny(403, decision.reason, rule=decision.rule, ref=decision.ref,
                       url=_url(checked), method=checked.method)
        llm = engine.policy.llm
        api = metering.api_for_host(llm, checked.host)
        model_call = api is not None and metering.is_model_call(
            llm, checked.host, checked.method, checked.path)
        if model_call:
            refusal = await svc.io(svc.meter.check, att.sandbox_id, llm)
            if refusal:
                return await self._refuse_model_call(req, api, refusal, checked)
        headers, target = checked.headers, checked.target
        broker = att.broker
        if broker is not None:
            rw = broker.rewrite(checked.host, headers, target)
            if rw.blocked:
                hosts = ", ".join(broker.hosts(rw.blocked))
                raise Deny(403, f"corral: the request carries the sentinel of secret "
                                f"{rw.blocked}, which may only be sent to {hosts}; a request "
                                f"to {checked.host} with it is blocked.",
                           event="secret.exfiltration_blocked", secret=rw.blocked,
                           host=checked.host, url=_url(checked), method=checked.method)
            headers, target = rw.headers, rw.target
            for name in rw.injected:
                svc.audit.emit("secret.injected", sandbox=att.sandbox_id, task=att.task_id,
                               secret=name, host=checked.host)
        key = await self._upstream(engine, checked.scheme, checked.host, checked.port)
        websocket = _wants_websocket(checked.headers)
        plan = Plan(key=key, method=checked.method, target=target, headers=headers,
                    prefix=prefix, body_done=body_done, websocket=websocket,
                    identity=broker is not None or model_call,
                    scrubber=broker.scrubber() if broker is not None else None,
                    scrub_text=broker.scrub_text if broker is not None else None)
        if model_call:
            host, meth, path = checked.host, checked.method, checked.path
            plan.meter = lambda ct, ce: metering.parser_for(llm, host, meth, path, ct, ce)
        try:
            out = await forward(self.client, svc, plan)
        except UpstreamError as exc:
            raise Deny(502, f"corral: {exc}", event="request.failed",
                       url=_url(checked)) from None
        extra: dict[str, Any] = {"websocket": True} if out.upgraded else {}
        svc.audit.emit("request.allowed", sandbox=att.sandbox_id, task=att.task_id,
                       method=checked.method, url=_url(checked), rule=decision.rule,
                       ref=decision.ref, status=out.status, bytes=out.sent, **extra)
        meter = out.extra.get("meter")
        if meter is not None:
            await self._record_usage(meter.usage(), llm)
        return out.keep_alive

    async def _read_push(self, checked: canon.CanonicalRequest
                         ) -> tuple[bytes, bool, tuple[RefUpdate, ...]]:
        """Read a push's command list (kept, to be forwarded as is) -> (bytes, ended, updates)."""
        enc = next((v for k, v in checked.headers if k.lower() == "content-encoding"), None)
        head = gitproto.ReceivePackHead(enc)
        if self.client.conn.they_are_waiting_for_100_continue:
            self.client.send(h11.InformationalResponse(status_code=100, headers=[]))
            await self.client.drain()
        kept = bytearray()
        ended = False
        while True:
            ev = await self.client.next_event(timeout=HEAD_TIMEOUT)
            if isinstance(ev, h11.Data):
                kept += ev.data
                if head.feed(ev.data):
                    break
            elif isinstance(ev, h11.EndOfMessage):
                head.finish()
                ended = True
                break
            else:
                raise OSError("the client went away during a push")
        if head.error:
            raise Deny(403, f"corral: the git push could not be checked: {head.error}.",
                       url=_url(checked), kind="git")
        return bytes(kept), ended, head.updates

    async def _hold(self, view: RequestView, decision: Decision, engine: Engine) -> Decision:
        """Hold the live request until a human approves or denies it (or time runs out)."""
        svc, att = self.svc, self.att
        timeout = engine.approval_timeout
        ap = await svc.io(lambda: svc.approvals.hold(view, decision, timeout=timeout))
        svc.audit.emit("request.held", sandbox=att.sandbox_id, task=att.task_id,
                       approval=ap.id, summary=ap.summary, reason=decision.reason)
        waiting = asyncio.ensure_future(svc.held(svc.approvals.wait, ap.id, timeout))
        gone = asyncio.ensure_future(self._client_gone())
        try:
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not waiting.done():
                # the client gave up (or the daemon stops): withdraw the request
                await svc.io(svc.approvals.cancel, ap.id)
        status = await waiting
        if status == "approved":
            return Decision("allow", f"approved by a human ({ap.id})", decision.rule,
                            decision.ref)
        if status == "timeout":
            return Decision("deny", f"corral: nobody approved this request within "
                                    f"{timeout:g}s ({ap.id}): {decision.reason}",
                            decision.rule, decision.ref)
        final = await svc.io(svc.approvals.get, ap.id)
        why = final.decision_reason or decision.reason
        return Decision("deny", f"corral: a human denied this request ({ap.id}): {why}",
                        decision.rule, decision.ref)

    async def _client_gone(self) -> None:
        """Return when the client hangs up (reading ahead into h11's buffer, at most
        1 MiB of a body, so nothing it sent is lost)."""
        buffered = 0
        while buffered < DRAIN_LIMIT:
            data = await self.client.reader.read(65536)
            self.client.conn.receive_data(data)
            if not data:
                return
            buffered += len(data)
        await asyncio.Event().wait()

    async def _upstream(self, engine: Engine, scheme: str, host: str, port: int
                        ) -> UpstreamKey:
        """Where to connect for ``host:port``, after the address check."""
        extra = engine.extra_ca
        ca = str(extra) if extra else None
        mapped = engine.upstream(host, port)
        if mapped is not None:
            addrs = [mapped[0]]
            port_to = mapped[1]
        else:
            port_to = port
            try:
                addrs = [str(ipaddress.ip_address(host))]
            except ValueError:
                addrs = await _resolve(host, port)
                if not addrs:
                    raise Deny(502, f"corral: the name {host} does not resolve",
                               event="request.failed", host=host) from None
        first_denial: Decision | None = None
        for addr in addrs:
            d = engine.decide_address(host, port, ipaddress.ip_address(addr))
            if d.allowed:
                return UpstreamKey(scheme, host, addr, port_to, ca)
            first_denial = first_denial or d
        assert first_denial is not None
        raise Deny(403, first_denial.reason, kind="address", host=host, rule=first_denial.rule)

    async def _record_usage(self, usage: object, llm: object) -> None:
        from corral.security.types import Usage

        if not isinstance(usage, Usage):
            return
        att, svc = self.att, self.svc
        prices = getattr(llm, "prices", {})
        cost = await svc.io(lambda: svc.meter.record(att.sandbox_id, usage,
                                                     task_id=att.task_id, prices=prices))
        svc.audit.emit("llm.usage", sandbox=att.sandbox_id, task=att.task_id,
                       provider=usage.provider, model=usage.model,
                       input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                       cache_read_tokens=usage.cache_read_tokens,
                       cache_write_tokens=usage.cache_write_tokens, cost=cost)

    # -- answers the proxy makes itself ------------------------------------------------
    async def _refuse_model_call(self, req: h11.Request, api: metering.Api | None,
                                 message: str, checked: canon.CanonicalRequest) -> bool:
        status, headers, body = metering.refusal_response(api, message)
        self.svc.audit.emit("llm.limit_refused", sandbox=self.att.sandbox_id,
                            task=self.att.task_id, url=_url(checked), reason=message)
        return await self._respond(status, headers, body)

    async def _deny(self, d: Deny, req: h11.Request) -> bool:
        details: dict[str, Any] = {"method": req.method.decode("latin-1"),
                   "url": req.target.decode("latin-1")[:500], **d.details}
        self.svc.audit.emit(d.event, sandbox=self.att.sandbox_id, task=self.att.task_id,
                            reason=d.reason, status=d.status, mode=self.mode, **details)
        body = (d.reason.rstrip() + "\n").encode("utf-8")
        headers = [("content-type", "text/plain; charset=utf-8"),
                   ("content-length", str(len(body))),
                   ("x-corral-decision", "deny" if d.status == 403 else "error")]
        if d.close:
            headers.append(("connection", "close"))
        keep = await self._respond(d.status, headers, body)
        return keep and not d.close

    async def _respond(self, status: int, headers: list[tuple[str, str]], body: bytes) -> bool:
        c = self.client
        if c.conn.our_state is not h11.SEND_RESPONSE:
            c.close()
            return False
        c.send(h11.Response(status_code=status, headers=headers, reason=_phrase(status)))
        c.send(h11.Data(data=body))
        c.send(h11.EndOfMessage())
        await c.drain()
        if any(k == "connection" and v == "close" for k, v in headers):
            return False
        return await self._drain_request_body()

    async def _drain_request_body(self) -> bool:
        """Read and drop the rest of a refused request's body so the connection can be
        reused; False (close) when it is large or slow."""
        c = self.client
        seen = 0
        while c.conn.their_state is h11.SEND_BODY:
            try:
                ev = await c.next_event(timeout=5)
            except (TimeoutError, h11.ProtocolError, OSError):
                return False
            if isinstance(ev, h11.Data):
                seen += len(ev.data)
                if seen > DRAIN_LIMIT:
                    return False
            elif not isinstance(ev, h11.EndOfMessage):
                return False
        return True

    async def _plain_error(self, status: int, text: str) -> None:
        body = (text + "\n").encode()
        with contextlib.suppress(Exception):
            self.client.writer.write(
                f"HTTP/1.1 {status} Bad Request\r\ncontent-type: text/plain\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
            await self.client.writer.drain()


def _phrase(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _url(c: canon.CanonicalRequest) -> str:
    return f"{c.scheme}://{c.authority}{c.target}"[:500]


def _short(exc: BaseException) -> str:
    return (str(exc) or exc.__class__.__name__)[:200]


def _wants_websocket(headers: tuple[tuple[str, str], ...]) -> bool:
    upgrade = [v.strip().lower() for k, v in headers if k.lower() == "upgrade"]
    conn = {t.strip().lower() for k, v in headers if k.lower() == "connection"
            for t in v.split(",")}
    return upgrade == ["websocket"] and "upgrade" in conn


def _sni_of(writer: asyncio.StreamWriter) -> str | None:
    obj = writer.get_extra_info("ssl_object")
    return getattr(obj, "corral_sni", None) if obj is not None else None


def _sni_problem(sni: str | None, host: str, what: str) -> str | None:
    if sni is None:
        return None
    try:
        name = canon.canonical_host(sni)
    except canon.InvalidHost:
        return f"corral: the TLS server name {sni[:100]!r} is not a valid host name."
    if name != host:
        return (f"corral: the TLS server name (SNI) {name} differs from {what} {host}; "
                "domain fronting is not allowed.")
    return None


#: host -> (expiry, addresses): DNS answers the proxy looked up for upstreams
_dns_cache: dict[str, tuple[float, list[str]]] = {}
DNS_TTL = 30.0


async def _resolve(host: str, port: int) -> list[str]:
    """The addresses of ``host`` (cached ``DNS_TTL`` seconds; failures are not cached)."""
    now = time.monotonic()
    hit = _dns_cache.get(host)
    if hit is not None and hit[0] > now:
        return hit[1]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    seen: list[str] = []
    for family, *_rest, sockaddr in infos:
        addr = str(sockaddr[0])
        if addr not in seen and family in (socket.AF_INET, socket.AF_INET6):
            seen.append(addr)
    if len(_dns_cache) > 4096:
        _dns_cache.clear()
    _dns_cache[host] = (now + DNS_TTL, seen)
    return seen
