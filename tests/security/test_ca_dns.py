"""The fence's CA and DNS stub on their own (no sandbox): real TLS handshakes and
real DNS messages over real sockets."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.security.ca import CertificateAuthority
from corral.security.dns import (
    SYNTHETIC_NET,
    DnsStub,
    SyntheticNames,
    build_response,
    parse_query,
)


def _query(name: str, qtype: int = 1, qid: int = 0x1234) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p)
    return struct.pack("!6H", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0" + \
        struct.pack("!HH", qtype, 1)


def test_ca_key_is_private_and_leaves_verify(tmp_path: Path):
    ca = CertificateAuthority.create(tmp_path / "fence")
    key = tmp_path / "fence" / "ca.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" not in ca.trust_bundle()
    assert ca.trust_bundle().endswith(ca.cert_pem)
    again = CertificateAuthority.load(tmp_path / "fence")
    assert again.cert_pem == ca.cert_pem
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(ca.cert_pem)

    async def handshake(name: str, served: str = "api.example.test"
                        ) -> tuple[str | None, str | None]:
        got: dict[str, object] = {}

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await w.start_tls(again.server_context(served))
            got["sni"] = getattr(w.get_extra_info("ssl_object"), "corral_sni", None)
            w.close()
            await w.wait_closed()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        ctx = ssl.create_default_context(cafile=str(bundle))
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        _, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=name)
        alpn = w.get_extra_info("ssl_object").selected_alpn_protocol()
        w.close()
        await w.wait_closed()
        server.close()
        await server.wait_closed()
        return got.get("sni"), alpn  # type: ignore[return-value]

    assert asyncio.run(handshake("api.example.test")) == ("api.example.test", "http/1.1")
    # another name: the CA mints a certificate for it and the proxy learns the SNI
    assert asyncio.run(handshake("other.example.test"))[0] == "other.example.test"
    # IP literals (no SNI is sent for them) get an IP SAN
    assert asyncio.run(handshake("203.0.113.7", "203.0.113.7")) == (None, "http/1.1")


def test_ca_load_reports_a_missing_ca(tmp_path: Path):
    from corral.errors import SandboxError

    with pytest.raises(SandboxError, match="cannot be read"):
        CertificateAuthority.load(tmp_path / "nothing")


def test_synthetic_names_are_stable_and_persist(tmp_path: Path):
    path = tmp_path / "names.json"
    names = SyntheticNames(path)
    a = names.address("api.example.test")
    b = names.address("other.example.test")
    assert a != b and a in SYNTHETIC_NET and b in SYNTHETIC_NET
    assert names.address("api.example.test") == a
    again = SyntheticNames(path)  # a restarted daemon knows what the sandbox cached
    assert again.name(a) == "api.example.test"
    assert again.address("third.example.test") not in (a, b)
    assert again.name("8.8.8.8") is None and again.name("junk") is None


def test_stub_answers_allowed_names_only():
    seen: list[tuple[str, int, str | None, int]] = []
    stub = DnsStub(SyntheticNames(), lambda n: n.endswith(".example.test"),
                   log=lambda *a: seen.append(a))
    resp = stub.answer(_query("API.Example.Test."))
    assert resp is not None
    (qid, flags, _qd, an, _ns, _ar) = struct.unpack("!6H", resp[:12])
    assert qid == 0x1234 and flags & 0x000F == 0 and an == 1
    assert ipaddress.IPv4Address(resp[-4:]) in SYNTHETIC_NET
    resp = stub.answer(_query("leak.evil.test"))
    assert resp is not None and struct.unpack("!H", resp[2:4])[0] & 0x000F == 3  # NXDOMAIN
    resp = stub.answer(_query("api.example.test", qtype=28))  # AAAA: no data
    assert resp is not None and struct.unpack("!6H", resp[:12])[3] == 0
    assert [s[0] for s in seen] == ["api.example.test", "leak.evil.test", "api.example.test"]
    assert stub.answer(b"\x00\x01") is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_stub_never_crashes_on_garbage(data: bytes):
    stub = DnsStub(SyntheticNames(), lambda n: True)
    out = stub.answer(data)
    assert out is None or len(out) >= 12


def test_stub_over_real_udp_and_tcp_sockets():
    stub = DnsStub(SyntheticNames(), lambda n: n == "api.example.test")

    async def main() -> tuple[bytes, bytes]:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        u.setblocking(False)
        t = socket.socket()
        t.bind(("127.0.0.1", 0))
        t.listen()
        t.setblocking(False)
        transport = await stub.serve_udp(u)
        server = await stub.serve_tcp(t)
        loop = asyncio.get_running_loop()
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.setblocking(False)
        await loop.sock_sendto(c, _query("api.example.test"), u.getsockname())
        udp = await asyncio.wait_for(loop.sock_recv(c, 512), 5)
        r, w = await asyncio.open_connection(*t.getsockname())
        q = _query("api.example.test")
        w.write(struct.pack("!H", len(q)) + q)
        n = struct.unpack("!H", await r.readexactly(2))[0]
        tcp = await r.readexactly(n)
        w.close()
        await w.wait_closed()
        transport.close()
        server.close()
        await server.wait_closed()
        c.close()
        return udp, tcp

    udp, tcp = asyncio.run(main())
    assert udp == tcp and udp[-4:] == SYNTHETIC_NET[1].packed


def test_parse_and_build_roundtrip():
    q = parse_query(_query("a.b.example", qid=7))
    assert (q.id, q.name, q.qtype) == (7, "a.b.example", 1)
    resp = build_response(q, 0, [ipaddress.IPv4Address("198.18.0.9")])
    assert resp[:2] == b"\x00\x07" and resp.endswith(bytes([198, 18, 0, 9]))
