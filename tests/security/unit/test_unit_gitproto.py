"""Ref updates of a git push, parsed from bytes a real ``git push`` sent.

A loopback HTTP server runs ``git http-backend`` (CGI) and keeps the body of
every receive-pack request, so the parser is tested on the real wire format.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.security.gitproto import (
    GitProtocolError,
    ReceivePackHead,
    is_receive_pack_discovery,
    is_receive_pack_request,
    parse_ref_updates,
)
from corral.security.types import RefUpdate

BACKEND = shutil.which("git-http-backend") or "/usr/lib/git-core/git-http-backend"
pytestmark = pytest.mark.skipif(not os.path.exists(BACKEND) or not shutil.which("git"),
                                reason="git and git-http-backend are needed")


class _Backend(BaseHTTPRequestHandler):
    root: Path
    bodies: list[tuple[str, bytes]]

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _cgi(self) -> None:
        body = self._body() if self.command == "POST" else b""
        path, _, query = self.path.partition("?")
        if self.command == "POST":
            self.bodies.append((path, body))
        env = {"GIT_PROJECT_ROOT": str(self.root), "GIT_HTTP_EXPORT_ALL": "1",
               "PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": self.command,
               "CONTENT_TYPE": self.headers.get("Content-Type", ""),
               "CONTENT_LENGTH": str(len(body)), "REMOTE_USER": "tester",
               "REMOTE_ADDR": "127.0.0.1", "PATH": os.environ["PATH"],
               "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(self.root)}
        r = subprocess.run([BACKEND], input=body, env=env, capture_output=True, check=False)
        head, _, out = r.stdout.partition(b"\r\n\r\n")
        status = 200
        headers = []
        for line in head.split(b"\r\n"):
            k, _, v = line.decode().partition(":")
            if k.lower() == "status":
                status = int(v.split()[0])
            elif k:
                headers.append((k, v.strip()))
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = _cgi
    do_POST = _cgi


@pytest.fixture
def git_server(tmp_path: Path) -> Iterator[tuple[str, Path, list[tuple[str, bytes]]]]:
    root = tmp_path / "srv"
    root.mkdir()
    bodies: list[tuple[str, bytes]] = []
    handler = type("H", (_Backend,), {"root": root, "bodies": bodies})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", root, bodies
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def git(cwd: Path, *args: str) -> str:
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd), "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_TERMINAL_PROMPT": "0", "NO_PROXY": "*", "no_proxy": "*"}
    r = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c",
                        "init.defaultBranch=main", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _repo(tmp_path: Path, root: Path, fmt: str = "sha1") -> Path:
    git(root, "init", "--bare", f"--object-format={fmt}", "app.git")
    work = tmp_path / f"work-{fmt}"
    work.mkdir()
    git(work, "init", f"--object-format={fmt}")
    (work / "a.txt").write_text("hello\n")
    git(work, "add", "a.txt")
    git(work, "commit", "-m", "one")
    return work


def test_real_push_creates_updates_and_deletes(tmp_path: Path, git_server) -> None:
    url, root, bodies = git_server
    work = _repo(tmp_path, root)
    git(work, "remote", "add", "origin", f"{url}/app.git")
    git(work, "branch", "feature/x")
    git(work, "push", "origin", "main", "feature/x")
    head = git(work, "rev-parse", "HEAD")
    path, body = bodies[-1]
    assert is_receive_pack_request("POST", path)
    ups = parse_ref_updates(body)
    assert set(ups) == {RefUpdate("0" * 40, head, "refs/heads/main"),
                        RefUpdate("0" * 40, head, "refs/heads/feature/x")}
    assert all(u.is_create and not u.is_delete for u in ups)

    (work / "a.txt").write_text("two\n")
    git(work, "commit", "-am", "two")
    new = git(work, "rev-parse", "HEAD")
    git(work, "push", "origin", "main", ":feature/x")
    ups = parse_ref_updates(bodies[-1][1])
    assert set(ups) == {RefUpdate(head, new, "refs/heads/main"),
                        RefUpdate(head, "0" * 40, "refs/heads/feature/x")}
    assert [u.ref for u in ups if u.is_delete] == ["refs/heads/feature/x"]

    # a delete-only push has no pack after the flush
    git(work, "push", "origin", "main:refs/heads/tmp")
    git(work, "push", "origin", ":tmp")
    only = bodies[-1][1]
    assert only.endswith(b"0000")
    (u,) = parse_ref_updates(only)
    assert u.is_delete and u.ref == "refs/heads/tmp"
    # the server really has what git pushed (the capture did not disturb it)
    assert git(root / "app.git", "rev-parse", "main") == new


def test_real_push_sha256(tmp_path: Path, git_server) -> None:
    url, root, bodies = git_server
    work = _repo(tmp_path, root, "sha256")
    git(work, "remote", "add", "origin", f"{url}/app.git")
    git(work, "push", "origin", "main")
    (u,) = parse_ref_updates(bodies[-1][1])
    assert len(u.new) == 64 and u.is_create and u.new == git(work, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def captured(tmp_path_factory) -> bytes:
    """One real push body with three refs, for the property tests."""
    tmp = tmp_path_factory.mktemp("cap")
    root = tmp / "srv"
    root.mkdir()
    bodies: list[tuple[str, bytes]] = []
    handler = type("H", (_Backend,), {"root": root, "bodies": bodies})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        work = _repo(tmp, root)
        git(work, "branch", "b1")
        git(work, "tag", "v1")
        git(work, "push", f"http://127.0.0.1:{srv.server_address[1]}/app.git", "main", "b1",
            "refs/tags/v1")
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)
    return bodies[-1][1]


def _end_of_commands(body: bytes) -> int:
    pos = 0
    while body[pos:pos + 4] != b"0000":
        pos += int(body[pos:pos + 4], 16)
    return pos + 4


def test_captured_shape(captured: bytes) -> None:
    ups = parse_ref_updates(captured)
    assert [u.ref for u in ups] == ["refs/heads/main", "refs/heads/b1", "refs/tags/v1"]
    head = ReceivePackHead()
    assert head.feed(captured)
    assert "side-band-64k" in head.capabilities
    assert captured[_end_of_commands(captured):].startswith(b"PACK")


@given(st.lists(st.integers(min_value=1, max_value=200), max_size=20))
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_chunking_gives_the_same_updates(captured: bytes, cuts: list[int]) -> None:
    chunks, pos = [], 0
    for c in cuts:
        chunks.append(captured[pos:pos + c])
        pos += c
    chunks.append(captured[pos:])
    assert parse_ref_updates(chunks) == parse_ref_updates(captured)


@given(st.data())
@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_truncated_or_garbled_heads_are_errors_never_crashes(captured: bytes, data) -> None:
    end = _end_of_commands(captured)
    cut = data.draw(st.integers(min_value=0, max_value=end - 1))
    with pytest.raises(GitProtocolError):
        parse_ref_updates(captured[:cut])
    body = bytearray(captured[:end])
    i = data.draw(st.integers(min_value=0, max_value=end - 1))
    body[i] = data.draw(st.integers(min_value=0, max_value=255))
    try:
        ups = parse_ref_updates(bytes(body))
    except GitProtocolError:
        return
    # a flip that still parses can only change hex digits or capabilities
    assert len(ups) == 3 and all(u.ref.startswith("refs/") for u in ups)


@pytest.mark.parametrize(("body", "why"), [
    (b"", "ended before"),
    (b"00", "ended before"),
    (b"zzzz", "bad pkt-line"),
    (b"0003", "bad pkt-line"),
    (b"0009hello0000", "not a ref-update"),
    (b"%04x%s 0000" % (4 + 10, b"push-cert\0"), "signed pushes"),
])
def test_bad_bodies(body: bytes, why: str) -> None:
    with pytest.raises(GitProtocolError, match=why):
        parse_ref_updates(body)


def _pkt(s: bytes) -> bytes:
    return b"%04x" % (len(s) + 4) + s


def test_synthetic_shapes() -> None:
    a, b = "a" * 40, "b" * 40
    body = (_pkt(f"shallow {a}\n".encode())
            + _pkt(f"{a} {b} refs/heads/x\0report-status side-band-64k\n".encode())
            + _pkt(f"{b} {'0' * 40} refs/heads/y\n".encode()) + b"0000PACK...")
    ups = parse_ref_updates(body)
    assert ups == (RefUpdate(a, b, "refs/heads/x"), RefUpdate(b, "0" * 40, "refs/heads/y"))
    assert parse_ref_updates(b"0000") == ()
    assert parse_ref_updates(gzip.compress(body), "gzip") == ups
    with pytest.raises(GitProtocolError, match="Content-Encoding"):
        parse_ref_updates(body, "br")
    with pytest.raises(GitProtocolError, match="NUL"):
        parse_ref_updates(_pkt(f"{a} {b} refs/heads/x\0caps\n".encode())
                          + _pkt(f"{a} {b} refs/heads/y\0more\n".encode()) + b"0000")
    with pytest.raises(GitProtocolError, match="not a ref-update"):
        parse_ref_updates(_pkt(f"{a} {b} refs/heads/a b\n".encode()) + b"0000")
    with pytest.raises(GitProtocolError, match="different lengths"):
        parse_ref_updates(_pkt(f"{a} {'c' * 64} refs/heads/x\n".encode()) + b"0000")
    big = ReceivePackHead(max_bytes=100)
    assert big.feed(_pkt(f"{a} {b} refs/heads/x\n".encode()) * 3)
    assert big.error and "too large" in big.error


def test_detection() -> None:
    assert is_receive_pack_request("POST", "/acme/app.git/git-receive-pack")
    assert not is_receive_pack_request("GET", "/acme/app.git/git-receive-pack")
    assert not is_receive_pack_request("POST", "/acme/app.git/git-upload-pack")
    assert is_receive_pack_discovery("GET", "/a.git/info/refs", "service=git-receive-pack")
    assert not is_receive_pack_discovery("GET", "/a.git/info/refs", "service=git-upload-pack")
    assert not is_receive_pack_discovery("GET", "/a.git/info/refs",
                                         "service=git-receive-pack-x")
