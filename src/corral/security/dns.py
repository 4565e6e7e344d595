"""The sandbox's resolver: a DNS stub on 127.0.0.1:53 inside its namespace.

Queries never leave the host. A name the policy could allow gets a *synthetic*
IPv4 address from ``SYNTHETIC_NET`` (198.18.0.0/15, the benchmarking range:
never routed, and corral never assigns it to an interface in the host's
namespace); the proxy maps the address back to the name when a tool connects
to it in transparent mode, so the connection is decided by name like any
other. Every other name is NXDOMAIN, AAAA queries get no answer (the sandbox
has no IPv6 route) and every query is written to the audit log.

Only the small part of RFC 1035 a stub needs is implemented: one question per
query, A / AAAA / anything else, over UDP and TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SYNTHETIC_NET", "DnsQuery", "DnsStub", "SyntheticNames", "build_response",
           "parse_query"]

SYNTHETIC_NET = ipaddress.IPv4Network("198.18.0.0/15")
TYPE_A, TYPE_AAAA = 1, 28
RCODE_OK, RCODE_FORMERR, RCODE_SERVFAIL, RCODE_NXDOMAIN, RCODE_NOTIMP = 0, 1, 2, 3, 4
_TTL = 30


class DnsFormatError(ValueError):
    """A query this stub cannot read."""


@dataclass(frozen=True)
class DnsQuery:
    id: int
    flags: int
    name: str  # lowercase, no trailing dot
    qtype: int
    qclass: int
    question: bytes  # the question section as sent (echoed back)


def parse_query(data: bytes) -> DnsQuery:
    """Read a one-question query. Raises ``DnsFormatError``."""
    if len(data) < 12:
        raise DnsFormatError("short DNS header")
    qid, flags, qd, _an, _ns, _ar = struct.unpack("!6H", data[:12])
    if flags & 0x8000:
        raise DnsFormatError("not a query")
    if qd != 1:
        raise DnsFormatError("exactly one question is supported")
    labels: list[str] = []
    pos = 12
    while True:
        if pos >= len(data):
            raise DnsFormatError("truncated name")
        n = data[pos]
        pos += 1
        if n == 0:
            break
        if n & 0xC0 or pos + n > len(data):
            raise DnsFormatError("bad label")
        labels.append(data[pos:pos + n].decode("ascii", "replace").lower())
        pos += n
    if pos + 4 > len(data):
        raise DnsFormatError("truncated question")
    qtype, qclass = struct.unpack("!HH", data[pos:pos + 4])
    return DnsQuery(qid, flags, ".".join(labels), qtype, qclass, data[12:pos + 4])


def build_response(q: DnsQuery, rcode: int,
                   answers: Sequence[ipaddress.IPv4Address] = ()) -> bytes:
    """A response echoing the question, with A records pointing at the question name."""
    # QR, opcode copied, AA, RD copied, RA
    flags = 0x8000 | (q.flags & 0x7800) | 0x0400 | (q.flags & 0x0100) | 0x0080 | rcode
    head = struct.pack("!6H", q.id, flags, 1, len(answers), 0, 0)
    body = bytearray(q.question)
    for addr in answers:
        body += struct.pack("!HHHIH", 0xC00C, TYPE_A, 1, _TTL, 4) + addr.packed
    return head + bytes(body)


def error_response(data: bytes, rcode: int) -> bytes | None:
    """A header-only error answer for a query we could not parse (None if hopeless)."""
    if len(data) < 12:
        return None
    qid, flags = struct.unpack("!HH", data[:4])
    return struct.pack("!6H", qid, 0x8000 | (flags & 0x7900) | 0x0080 | rcode, 0, 0, 0, 0)


class SyntheticNames:
    """Name <-> synthetic address for one sandbox, kept in a small JSON file so a
    restarted proxy still knows the addresses the sandbox has cached."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._by_name: dict[str, ipaddress.IPv4Address] = {}
        self._by_addr: dict[ipaddress.IPv4Address, str] = {}
        self._lock = threading.Lock()
        self._next = 1
        if path is not None and path.exists():
            with contextlib.suppress(OSError, ValueError):
                for name, a in json.loads(path.read_text()).items():
                    addr = ipaddress.IPv4Address(a)
                    if addr in SYNTHETIC_NET:
                        self._by_name[name] = addr
                        self._by_addr[addr] = name
                        self._next = max(self._next, int(addr) - int(SYNTHETIC_NET[0]) + 1)

    def address(self, name: str) -> ipaddress.IPv4Address:
        """The synthetic address of ``name`` (allocated on first use)."""
        with self._lock:
            addr = self._by_name.get(name)
            if addr is not None:
                return addr
            size = SYNTHETIC_NET.num_addresses - 2
            addr = SYNTHETIC_NET[1 + (self._next - 1) % size]
            self._next += 1
            old = self._by_addr.pop(addr, None)
            if old is not None:  # wrapped around: the oldest mapping is reused
                self._by_name.pop(old, None)
            self._by_name[name] = addr
            self._by_addr[addr] = name
            self._save()
            return addr

    def name(self, addr: str | ipaddress.IPv4Address) -> str | None:
        """The name a synthetic address stands for (None: not one of ours)."""
        try:
            a = ipaddress.IPv4Address(addr)
        except ValueError:
            return None
        with self._lock:
            return self._by_addr.get(a)

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        data = {n: str(a) for n, a in self._by_name.items()}
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.path)


#: (name) -> whether the policy could allow connections to it
Resolvable = Callable[[str], bool]
#: (name, qtype, answer or None, rcode) -> None; the audit hook
QueryLog = Callable[[str, int, str | None, int], None]


class DnsStub:
    """Answers one sandbox's queries. ``answer`` is pure; the servers below wrap it."""

    def __init__(self, names: SyntheticNames, resolvable: Resolvable,
                 log: QueryLog | None = None) -> None:
        self.names = names
        self.resolvable = resolvable
        self.log = log

    def answer(self, data: bytes) -> bytes | None:
        try:
            q = parse_query(data)
        except DnsFormatError:
            return error_response(data, RCODE_FORMERR)
        name = q.name.rstrip(".")
        answers: list[ipaddress.IPv4Address]
        if q.qclass != 1:
            rcode, answers = RCODE_NOTIMP, []
        elif not name or not self._allowed(name):
            rcode, answers = RCODE_NXDOMAIN, []
        elif q.qtype == TYPE_A:
            rcode, answers = RCODE_OK, [self.names.address(name)]
        else:
            rcode, answers = RCODE_OK, []  # AAAA and the rest: the name exists, no data
        if self.log is not None:
            self.log(name, q.qtype, str(answers[0]) if answers else None, rcode)
        return build_response(q, rcode, answers)

    def _allowed(self, name: str) -> bool:
        try:
            return self.resolvable(name)
        except Exception:  # noqa: BLE001 - a broken policy callback answers "no", never crashes the stub
            return False

    # -- servers ----------------------------------------------------------------------
    async def serve_udp(self, sock: socket.socket) -> asyncio.DatagramTransport:
        loop = asyncio.get_running_loop()
        stub = self

        class Proto(asyncio.DatagramProtocol):
            transport: asyncio.DatagramTransport

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport  # type: ignore[assignment]

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                out = stub.answer(data)
                if out is not None:
                    self.transport.sendto(out, addr)

        transport, _ = await loop.create_datagram_endpoint(Proto, sock=sock)
        return transport

    async def serve_tcp(self, sock: socket.socket) -> asyncio.Server:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await asyncio.wait_for(reader.readexactly(2), 30)
                    (n,) = struct.unpack("!H", head)
                    data = await asyncio.wait_for(reader.readexactly(n), 30)
                    out = self.answer(data)
                    if out is None:
                        break
                    writer.write(struct.pack("!H", len(out)) + out)
                    await writer.drain()
            except (asyncio.IncompleteReadError, TimeoutError, OSError):
                pass
            finally:
                writer.close()

        return await asyncio.start_server(handle, sock=sock)
