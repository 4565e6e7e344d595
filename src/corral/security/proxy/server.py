"""``ProxyServer``: the sandboxes one daemon serves, and their listeners.

Attaching a sandbox opens, inside its network namespace, the explicit proxy
(127.0.0.1:3128), the transparent port (3129, where the namespace's nftables
rules send every other TCP connect) and the DNS stub (127.0.0.1:53, UDP and
TCP), and installs those rules. Every socket is checked to live in that
namespace.

Attaching is idempotent and one sandbox's attaches are serialized: attaching a
sandbox that is already served (same record, same namespace, listeners open)
only hands over the secret values it came with. Only a changed record or a
replaced namespace replaces the listeners, and then the old ones are closed
*completely* before the new ones are bound. Detaching twice is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from corral.errors import SandboxError
from corral.security import netns
from corral.security.proxy.attachment import Attachment, FenceRecord, SecretValues
from corral.security.proxy.services import Services
from corral.security.proxy.session import Session, _sni_of, _sni_problem
from corral.security.proxy.streams import open_accepted, peek

__all__ = ["ProxyServer"]

log = logging.getLogger("corral.security.proxy")

#: how a plain HTTP request starts (a method, a space, then a target)
_HTTP_START = re.compile(rb"^[A-Z]{3,12} [/a-zA-Z*]")
#: a transparent connection must say something (TLS hello or HTTP) within this time
FIRST_BYTE_TIMEOUT = 10.0
DNS_PORT = 53


class ProxyServer:
    """Serves every attached sandbox from one event loop."""

    def __init__(self, home: Path, services: Services) -> None:
        self.home = home
        self.svc = services
        self.attachments: dict[str, Attachment] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # one sandbox's attaches and detaches run one at a time: lock and its users
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def _serialized(self, sandbox_id: str) -> AsyncIterator[None]:
        """Hold the sandbox's lock; the lock is dropped once nobody holds or waits
        for it (dropping it earlier would let a newcomer in beside a waiter)."""
        lock, users = self._locks.setdefault(sandbox_id, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[sandbox_id]

    async def attach(self, record: FenceRecord, directory: Path,
                     secrets: SecretValues | None = None) -> Attachment:
        """Attach (or re-attach) one sandbox. Raises ``CorralError`` subclasses."""
        async with self._serialized(record.sandbox_id):
            return await self._attach(record, directory, secrets)

    async def _attach(self, record: FenceRecord, directory: Path,
                      secrets: SecretValues | None) -> Attachment:
        sid = record.sandbox_id
        try:
            nsid = netns.netns_id(record.netns)
        except OSError:
            raise SandboxError(f"the network namespace {record.netns} is gone",
                               sandbox_id=sid) from None
        old = self.attachments.get(sid)
        if old is not None and old.serves(record, nsid):
            if secrets:
                await asyncio.to_thread(old.give_secrets, secrets)
            return old
        if old is not None:
            await self._detach(sid, reason="re-attached")
        att = await asyncio.to_thread(
            Attachment, record, directory, self.home, audit=self.svc.audit_log,
            store=self.svc.store, secrets=secrets, sink=self.svc.audit, netns_id=nsid)
        try:
            await self._listen(att, nsid)
        except BaseException:
            await att.aclose()
            raise
        self.attachments[sid] = att
        self.svc.audit.emit("fence.attached", sandbox=att.sandbox_id, task=att.task_id,
                            actor="proxy", policy=record.policy,
                            transparent=record.transparent,
                            **({"errors": att.errors} if att.errors else {}))
        return att

    async def detach(self, sandbox_id: str, *, reason: str | None = None) -> bool:
        """Close a sandbox's listeners (waiting until they are closed). False if it was
        not attached; detaching twice is harmless."""
        async with self._serialized(sandbox_id):
            return await self._detach(sandbox_id, reason=reason)

    async def _detach(self, sandbox_id: str, *, reason: str | None) -> bool:
        att = self.attachments.pop(sandbox_id, None)
        if att is None:
            return False
        await att.aclose()
        if reason:
            self.svc.audit.emit("fence.detached", sandbox=sandbox_id, task=att.task_id,
                                reason=reason)
        return True

    async def aclose(self) -> None:
        for sid in list(self.attachments):
            await self.detach(sid)
        for t in list(self._tasks):
            t.cancel()

    # -- listeners -------------------------------------------------------------------
    async def _listen(self, att: Attachment, nsid: netns.NetnsId) -> None:
        ns = att.record.netns
        specs = [netns.Listen("proxy", netns.PROXY_PORT),
                 netns.Listen("dns_udp", DNS_PORT, "udp"),
                 netns.Listen("dns_tcp", DNS_PORT, backlog=64)]
        if att.record.transparent:
            specs.append(netns.Listen("transparent", netns.TRANSPARENT_PORT))

        def sockets() -> dict[str, socket.socket]:
            made = netns.make_sockets(ns, specs, expect=nsid)
            try:
                if att.record.transparent:
                    netns.apply_rules(ns, expect=nsid)
            except BaseException:
                for s in made.values():
                    s.close()
                raise
            return made

        socks = await asyncio.to_thread(sockets)
        # from here on the attachment owns them: aclose() closes and waits for each
        att.sockets = dict(socks)
        svc = self.svc

        async def explicit(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            _nodelay(writer.get_extra_info("socket"))
            await Session(att, svc, reader, writer).run()

        try:
            server = await asyncio.start_server(explicit, sock=socks["proxy"],
                                                limit=64 * 1024)
        except BaseException:
            for s in socks.values():
                s.close()
            raise
        att.closers.append(server)
        try:
            att.closers.append(await att.dns.serve_udp(socks["dns_udp"]))
        except BaseException:
            socks["dns_udp"].close()
            raise
        try:
            att.closers.append(await att.dns.serve_tcp(socks["dns_tcp"]))
        except BaseException:
            socks["dns_tcp"].close()
            raise

        def log_query(name: str, qtype: int, answer: str | None, rcode: int) -> None:
            svc.audit.emit("dns.query", sandbox=att.sandbox_id, task=att.task_id,
                           name=name, type=qtype, answer=answer, rcode=rcode)

        att.dns.log = log_query
        if "transparent" in socks:
            tsock = socks["transparent"]
            task = asyncio.create_task(self._accept_transparent(att, tsock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            att.closers.append(_TaskCloser(task, tsock))

    async def _accept_transparent(self, att: Attachment, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(lsock)
            except asyncio.CancelledError:
                raise
            except OSError:
                if lsock.fileno() < 0:
                    return
                await asyncio.sleep(0.05)
                continue
            task = asyncio.create_task(self._transparent(att, conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _transparent(self, att: Attachment, conn: socket.socket) -> None:
        """A connect the namespace's rules redirected: recover where it was going."""
        svc = self.svc
        conn.setblocking(False)
        _nodelay(conn)
        try:
            dst_ip, dst_port = netns.original_dst(conn)
        except OSError:
            conn.close()
            return
        name = att.names.name(dst_ip)
        host = name or dst_ip
        first = await peek(conn, 16, FIRST_BYTE_TIMEOUT)
        if not first or not (first[0] == 0x16 or _HTTP_START.match(first)):
            svc.audit.emit("request.denied", sandbox=att.sandbox_id, task=att.task_id,
                           mode="transparent", url=f"tcp://{host}:{dst_port}",
                           reason="not HTTP or TLS: only HTTP(S) leaves the sandbox")
            conn.close()
            return
        try:
            if first[0] == 0x16:
                ctx = att.ca.server_context(host)
                reader, writer = await open_accepted(conn, ctx)
                sni = _sni_of(writer)
                what = "the name it connected to" if name else \
                    f"the address {dst_ip} it connected to (connect by name)"
                problem = _sni_problem(sni, host, what)
                session = Session(att, svc, reader, writer, scheme="https",
                                  authority=(host, dst_port), problem=problem,
                                  mode="transparent")
            else:
                reader, writer = await open_accepted(conn)
                session = Session(att, svc, reader, writer, scheme="http",
                                  authority=(host, dst_port), mode="transparent")
        except (OSError, TimeoutError, ConnectionError) as exc:
            svc.audit.emit("request.denied", sandbox=att.sandbox_id, task=att.task_id,
                           mode="transparent", url=f"tcp://{host}:{dst_port}",
                           reason=f"TLS handshake failed: {exc}")
            conn.close()
            return
        await session.run()


def _nodelay(sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _TaskCloser:
    """Stops the transparent listener's accept loop, then closes its socket: closing
    the socket first would free its fd number while the loop still watches it."""

    def __init__(self, task: asyncio.Task[Any], sock: socket.socket) -> None:
        self.task, self.sock = task, sock

    def is_closing(self) -> bool:
        return self.task.done() or self.sock.fileno() < 0

    def close(self) -> None:
        if self.task.done():
            self._close_sock(self.task)
            return
        self.task.cancel()
        self.task.add_done_callback(self._close_sock)

    def _close_sock(self, _task: asyncio.Task[Any]) -> None:
        with contextlib.suppress(Exception):
            self.sock.close()
