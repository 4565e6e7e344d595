"""The proxy's HTTP behaviour and the daemon's lifecycle, with real clients inside
real sandboxes: WebSocket, ALPN, upstream verification, large bodies, plain
HTTP, restarts and re-attachment."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

from fence_servers import pattern, py, run

from corral.security.daemon import DaemonClient

RULES = """
- {host: api.example.test, decision: allow}
- {host: ws.example.test, decision: allow}
"""


def _home() -> Path:
    from corral.compute.context import get_context

    return get_context().home


def test_websocket_upgrade_passes_after_the_rule_check(write_policy, fenced, tls_upstream):
    sbx = fenced(write_policy(RULES + "- {host: ws.example.test, paths: [/denied], "
                                      "decision: deny}"))
    r = py(sbx, """
        import base64, os, socket, ssl
        def ws(path):
            s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
            s.sendall(b"CONNECT ws.example.test:443 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
            assert s.recv(1024).startswith(b"HTTP/1.1 200")
            t = ssl.create_default_context().wrap_socket(s, server_hostname="ws.example.test")
            key = base64.b64encode(os.urandom(16)).decode()
            t.sendall((f"GET {path} HTTP/1.1\\r\\nHost: ws.example.test\\r\\n"
                       "Upgrade: websocket\\r\\nConnection: Upgrade\\r\\n"
                       f"Sec-WebSocket-Key: {key}\\r\\nSec-WebSocket-Version: 13\\r\\n\\r\\n"
                       ).encode())
            head = b""
            while b"\\r\\n\\r\\n" not in head:
                head += t.recv(1)
            status = head.split(b" ")[1].decode()
            if status != "101":
                return status
            mask = os.urandom(4)
            data = b"hello through the fence"
            t.sendall(bytes([0x81, 0x80 | len(data)]) + mask
                      + bytes(c ^ mask[i % 4] for i, c in enumerate(data)))
            frame = t.recv(1024)
            return status + " " + frame[2:].decode()
        print(ws("/ws"))
        print(ws("/denied"))
    """)
    assert r.stdout.splitlines() == ["101 hello through the fence", "403"], r.stderr


def test_alpn_h2_falls_back_to_http11(write_policy, fenced):
    sbx = fenced(write_policy(RULES))
    r = run(sbx, "curl -sS --http2 -o /dev/null -w '%{http_version}' "
                 "https://api.example.test/alpn")
    assert r.stdout == "1.1", r.stderr
    r = py(sbx, """
        import socket, ssl
        s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
        s.sendall(b"CONNECT api.example.test:443 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        s.recv(1024)
        ctx = ssl.create_default_context()
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        t = ctx.wrap_socket(s, server_hostname="api.example.test")
        print(t.selected_alpn_protocol())
    """)
    assert r.stdout.strip() == "http/1.1"


def test_upstream_certificates_are_verified(write_policy, fenced, tmp_path):
    path = write_policy(RULES)
    # the same policy without the test CA: the upstream's certificate is not trusted
    text = "\n".join(ln for ln in path.read_text().splitlines() if "extra_ca" not in ln)
    bare = tmp_path / "no-ca.yaml"
    bare.write_text(text + "\n")
    sbx = fenced(bare)
    r = run(sbx, "curl -sS -w '\\n%{http_code}' https://api.example.test/verify")
    assert r.stdout.endswith("502"), r.stdout
    assert "failed verification" in r.stdout


def test_large_bodies_and_plain_http(write_policy, fenced, tls_upstream, plain_upstream):
    sbx = fenced(write_policy(RULES))
    n = 20_000_003
    r = run(sbx, f"curl -sS https://api.example.test/pattern/{n} | sha256sum; "
                 f"curl -sS https://api.example.test/pattern/{n} https://api.example.test/"
                 f"pattern/{n} | sha256sum")
    one = hashlib.sha256(pattern(n)).hexdigest()
    two = hashlib.sha256(pattern(n) * 2).hexdigest()
    assert r.stdout.split()[::2] == [one, two], r.stderr  # the second: one kept-alive pair
    r = run(sbx, "head -c 5000000 /dev/zero | tr '\\0' 'a' > /tmp/up && "
                 "curl -sS -H 'Transfer-Encoding: chunked' --data-binary @/tmp/up "
                 "https://api.example.test/reflect | wc -c")
    assert r.stdout.strip() == "5000000", r.stderr
    assert tls_upstream.seen("/reflect")[-1].headers.get("transfer-encoding") == "chunked"
    r = run(sbx, "curl -sS http://api.example.test/plain-http")
    assert json.loads(r.stdout)["target"] == "/plain-http"
    assert plain_upstream.seen("/plain-http")


def test_upstream_connections_are_reused(write_policy, fenced, tls_upstream):
    sbx = fenced(write_policy(RULES))
    before = tls_upstream.connections
    r = run(sbx, "for i in 1 2 3 4 5 6 7 8; do curl -sS -o /dev/null "
                 "https://api.example.test/reuse-$i; done")
    assert r.exit_code == 0
    assert len(tls_upstream.seen("/reuse-")) == 8
    assert tls_upstream.connections - before <= 2


def test_daemon_restart_and_kill_reattach_running_sandboxes(write_policy, fenced):
    sbx = fenced(write_policy(RULES))
    client = DaemonClient(_home())
    ok = "curl -sS -o /dev/null -w '%{http_code}' --max-time 10 https://api.example.test/r; " \
         "echo; curl -sS --noproxy '*' -o /dev/null -w '%{http_code}' --max-time 10 " \
         "https://api.example.test/r"
    assert run(sbx, ok).stdout == "200\n200"
    first = client.ping()["pid"]  # type: ignore[index]
    assert client.stop()
    r = run(sbx, "curl -sS --max-time 5 https://api.example.test/r")
    assert r.exit_code != 0  # no proxy, no way out
    client.ensure_running()  # the restarted daemon re-attaches from the fence state
    assert run(sbx, ok).stdout == "200\n200"
    # killed outright (we started it; its pid is ours to kill)
    pid = client.ping()["pid"]  # type: ignore[index]
    assert pid != first
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while client.ping() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    client.ensure_running()
    assert run(sbx, ok).stdout == "200\n200"


def test_stop_and_resume_keep_the_fence(write_policy, fenced):
    sbx = fenced(write_policy(RULES))
    sbx.stop()
    sbx.resume()
    r = run(sbx, "curl -sS -o /dev/null -w '%{http_code}' https://api.example.test/resumed; "
                 "echo; curl -sS --noproxy '*' https://evil.test/ 2>&1 | head -1")
    lines = r.stdout.splitlines()
    assert lines[0] == "200"
    assert "resolve" in lines[1]


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except (OSError, IndexError):
            return True
        time.sleep(0.1)
    return False


def test_daemon_exits_when_idle_or_when_its_home_is_gone(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("CORRAL_PROXY_IDLE_EXIT", "1")
    idle = DaemonClient(tmp_path / "idle")
    assert _gone(idle.ensure_running()["pid"])
    assert idle.ping() is None
    monkeypatch.setenv("CORRAL_PROXY_IDLE_EXIT", "600")
    home = tmp_path / "home"
    pid = DaemonClient(home).ensure_running()["pid"]
    shutil.rmtree(home)
    assert _gone(pid)
