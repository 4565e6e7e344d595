"""Real upstream servers on loopback for the fence tests: HTTP(S) with keep-alive,
an echo that records every request, a WebSocket echo, ``git http-backend`` and a
tiny PyPI-like simple index. Nothing here is corral's own code."""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import os
import socket
import socketserver
import ssl
import struct
import subprocess
import textwrap
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    host: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def pattern(n: int) -> bytes:
    """``n`` bytes that are not all alike (a body whose order and content a test checks)."""
    return (bytes(range(251)) * (n // 251 + 1))[:n]


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


class Upstream:
    """A loopback HTTP(S) server; ``requests`` lists what reached it.

    Routes: ``/bytes/N`` (N bytes), ``/reflect`` (the request body back),
    ``/ws`` (WebSocket echo), ``/git/...`` (git http-backend over ``git_root``),
    ``/simple/...`` and ``/files/...`` (a simple index from ``index_root``);
    anything else answers a JSON echo of the request."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, *,
                 git_root: Path | None = None, index_root: Path | None = None) -> None:
        self.requests: list[Seen] = []
        self.connections = 0
        self.git_root = git_root
        self.index_root = index_root
        up = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                up.connections += 1

            def log_message(self, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("content-length") or 0)
                return self.rfile.read(n) if n else b""

            def _send(self, status: int, body: bytes, ctype: str = "application/json",
                      headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def handle_any(self) -> None:
                body = self._body()
                seen = Seen(self.command, self.path, {k.lower(): v for k, v in
                                                      self.headers.items()}, body,
                            host=self.headers.get("host"))
                up.requests.append(seen)
                path = self.path.split("?")[0]
                if path.startswith("/bytes/"):
                    n = int(path.rsplit("/", 1)[1])
                    self._send(200, b"x" * n, "application/octet-stream")
                elif path.startswith("/pattern/"):
                    self._send(200, pattern(int(path.rsplit("/", 1)[1])),
                               "application/octet-stream")
                elif path == "/reflect":
                    self._send(200, body, "text/plain")
                elif path == "/ws" and self.headers.get("upgrade", "").lower() == "websocket":
                    self._websocket()
                elif path.startswith("/git/") and up.git_root is not None:
                    self._git(body)
                elif (path.startswith("/simple/") or path.startswith("/files/")) \
                        and up.index_root is not None:
                    self._static(up.index_root, path)
                else:
                    echo = {"method": self.command, "target": self.path,
                            "headers": seen.headers, "body": body.decode("latin-1")}
                    self._send(200, json.dumps(echo).encode())

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = \
                do_TRACE = handle_any

            def _websocket(self) -> None:
                key = self.headers["sec-websocket-key"]
                accept = base64.b64encode(hashlib.sha1(
                    (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
                self.send_response(101)
                self.send_header("upgrade", "websocket")
                self.send_header("connection", "Upgrade")
                self.send_header("sec-websocket-accept", accept)
                self.end_headers()
                self.wfile.flush()
                # echo one text frame (client frames are masked)
                _b1, b2 = self.rfile.read(2)
                n = b2 & 0x7F
                if n == 126:
                    n = struct.unpack("!H", self.rfile.read(2))[0]
                mask = self.rfile.read(4)
                data = bytes(c ^ mask[i % 4] for i, c in enumerate(self.rfile.read(n)))
                self.wfile.write(bytes([0x81, len(data)]) + data)
                self.wfile.flush()
                self.close_connection = True

            def _static(self, root: Path, path: str) -> None:
                f = (root / path.lstrip("/")).resolve()
                if f.is_dir():
                    f = f / "index.html"
                if not f.is_file() or root.resolve() not in f.parents:
                    self._send(404, b"not found", "text/plain")
                    return
                ctype = "text/html" if f.suffix == ".html" else "application/octet-stream"
                self._send(200, f.read_bytes(), ctype)

            def _git(self, body: bytes) -> None:
                path, _, query = self.path.partition("?")
                env = {
                    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    "GIT_PROJECT_ROOT": str(up.git_root), "GIT_HTTP_EXPORT_ALL": "1",
                    "REQUEST_METHOD": self.command, "PATH_INFO": path[len("/git"):],
                    "QUERY_STRING": query, "CONTENT_TYPE": self.headers.get("content-type", ""),
                    "CONTENT_LENGTH": str(len(body)), "REMOTE_USER": "agent",
                    "REMOTE_ADDR": "127.0.0.1",
                }
                r = subprocess.run(["git", "http-backend"], input=body, env=env,
                                   capture_output=True, check=False)
                head, _, out = r.stdout.partition(b"\r\n\r\n")
                status, headers = 200, {}
                for line in head.split(b"\r\n"):
                    k, _, v = line.decode().partition(":")
                    if k.lower() == "status":
                        status = int(v.strip().split()[0])
                    elif k:
                        headers[k] = v.strip()
                ctype = headers.pop("Content-Type", "application/octet-stream")
                self._send(status, out, ctype, headers)

        self.server = _Server(("127.0.0.1", 0), Handler)
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        self.port: int = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def seen(self, path_prefix: str) -> list[Seen]:
        return [r for r in self.requests if r.target.startswith(path_prefix)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class RawListener:
    """A loopback TCP listener that only counts connections (non-HTTP probes)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            c.close()

    def close(self) -> None:
        self.sock.close()


def make_wheel(directory: Path, name: str = "tinypkg", version: str = "1.0") -> Path:
    """A minimal pure-Python wheel (one module) written into ``directory``."""
    dist = f"{name}-{version}"
    files = {
        f"{name}.py": b"VALUE = 42\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\n"
                                      f"Version: {version}\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: corral-tests\n"
                                   b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = ""
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{path},sha256={digest},{len(data)}\n"
    record += f"{dist}.dist-info/RECORD,,\n"
    files[f"{dist}.dist-info/RECORD"] = record.encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    wheel = directory / f"{dist}-py3-none-any.whl"
    wheel.write_bytes(buf.getvalue())
    return wheel


def make_index(root: Path, name: str = "tinypkg") -> Path:
    """A PEP 503 simple index under ``root`` with one wheel of ``name``."""
    (root / "files").mkdir(parents=True, exist_ok=True)
    wheel = make_wheel(root / "files", name)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    pkg = root / "simple" / name
    pkg.mkdir(parents=True, exist_ok=True)
    (root / "simple" / "index.html").write_text(
        f'<html><body><a href="/simple/{name}/">{name}</a></body></html>\n')
    (pkg / "index.html").write_text(
        f'<html><body><a href="/files/{wheel.name}#sha256={sha}">{wheel.name}</a>'
        "</body></html>\n")
    return root


def run(sbx: Any, cmd: str | list[str], timeout: float = 60, **kw: Any) -> Any:
    """Run a command in the sandbox (helper for readable tests)."""
    return sbx.commands.run(cmd, timeout=timeout, **kw)


def py(sbx: Any, code: str, timeout: float = 60, prelude: str = "", **kw: Any) -> Any:
    """Run Python code (``prelude`` first) with the sandbox's own python3."""
    return sbx.commands.run(["python3", "-c", prelude + textwrap.dedent(code)],
                            timeout=timeout, **kw)
