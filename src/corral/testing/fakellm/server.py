"""``FakeLLM``: an HTTP server on loopback that answers like a model provider.

    with FakeLLM(script) as llm:                   # port 0: a free port
        env = {"ANTHROPIC_BASE_URL": llm.url, ...}
        ...run a real CLI...
        assert llm.requests[-1].api_key == "sk-test"

One server speaks all three APIs (Anthropic Messages, OpenAI Responses, OpenAI
Chat Completions) and records every request it receives, model calls or not,
with headers, body and the key it carried. It runs in a daemon thread; ``stop``
closes it. Plain HTTP by default; pass an ``ssl.SSLContext`` for HTTPS.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import socketserver
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from corral.testing.fakellm import actions, anthropic, chat, conversation, responses
from corral.testing.fakellm.script import Script

#: path (without the optional /v1 prefix) -> API
_ROUTES = {"/messages": "anthropic", "/responses": "responses",
           "/chat/completions": "chat"}


@dataclass
class RecordedRequest:
    """One request as the server received it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    #: anthropic | responses | chat, or None for anything else (probes, model lists)
    api: str | None = None
    #: which rule and turn answered (None: the fallback)
    rule: int | None = None
    turn: int | None = None
    status: int = 200
    #: the usage the reply reported (input, output)
    usage: tuple[int, int] | None = None
    time: float = field(default_factory=time.time)

    @property
    def api_key(self) -> str | None:
        """The key the client sent (``x-api-key``, or ``Authorization: Bearer``)."""
        key = self.headers.get("x-api-key")
        if key:
            return key
        auth = self.headers.get("authorization", "")
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    @property
    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def to_json(self) -> dict[str, Any]:
        return {"time": self.time, "method": self.method, "path": self.path,
                "query": self.query, "headers": self.headers,
                "body": self.body.decode("utf-8", "replace"), "api": self.api,
                "rule": self.rule, "turn": self.turn, "status": self.status,
                "usage": list(self.usage) if self.usage else None}


class FakeLLM:
    """A fake model provider on ``host:port`` (see the module docstring).

    ``api_key``: when set, model requests carrying any other key get the API's
    real 401 answer (this is how a test proves a proxy injected the real key).
    ``record``: a JSONL file that gets every request as it arrives.
    ``netns``: a network namespace file (``Sandbox.netns_path``): the listening
    socket is made inside it, so a sandbox reaches the server on its own
    loopback (no proxy, no veth) while this process serves it.
    """

    def __init__(self, script: Script | dict[str, Any] | str | None = None, *,
                 host: str = "127.0.0.1", port: int = 0, api_key: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, record: Path | None = None,
                 usage_chunk: bool = True, netns: str | Path | None = None) -> None:
        self.script = script if isinstance(script, Script) else \
            Script.parse(script or {})
        self.api_key = api_key
        self.usage_chunk = usage_chunk
        self.requests: list[RecordedRequest] = []
        self.on_request: Callable[[RecordedRequest], None] | None = None
        self._lock = threading.Lock()
        self._record = record
        self._httpd = _Server((host, port), _Handler, owner=self, ssl_context=ssl_context,
                              netns=netns)
        self._thread: threading.Thread | None = None
        self.scheme = "https" if ssl_context else "http"

    # -- lifecycle -----------------------------------------------------------------
    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The base URL, without ``/v1`` (what ``ANTHROPIC_BASE_URL`` takes)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def start(self) -> FakeLLM:
        """Serve in a daemon thread; returns at once (the socket already listens)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever,
                                            kwargs={"poll_interval": 0.05},
                                            name=f"fakellm-{self.port}", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (the ``corral fakellm`` command)."""
        self._httpd.serve_forever(poll_interval=0.2)

    def stop(self) -> None:
        """Stop serving and close the socket; idempotent."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what was asked ------------------------------------------------------------
    def model_requests(self, api: str | None = None) -> list[RecordedRequest]:
        """Recorded model API calls (of ``api`` if given), oldest first."""
        with self._lock:
            return [r for r in self.requests if r.api and (api is None or r.api == api)]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    def tokens(self) -> tuple[int, int]:
        """Input and output tokens reported over all answered model calls."""
        ins = outs = 0
        for r in self.model_requests():
            if r.usage:
                ins += r.usage[0]
                outs += r.usage[1]
        return ins, outs

    def _received(self, rec: RecordedRequest) -> None:
        # listed at once (its status and usage are filled in before the answer is
        # sent), so a client that has its answer always finds its request here
        with self._lock:
            self.requests.append(rec)

    def _recorded(self, rec: RecordedRequest) -> None:
        if self._record is not None:
            with self._record.open("a") as f:
                f.write(json.dumps(rec.to_json()) + "\n")
        if self.on_request is not None:
            self.on_request(rec)


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, addr: tuple[str, int], handler: type[_Handler], *, owner: FakeLLM,
                 ssl_context: ssl.SSLContext | None, netns: str | Path | None) -> None:
        self.address_family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.owner = owner
        self.ssl_context = ssl_context
        self.netns = netns
        super().__init__(addr, handler)

    def server_bind(self) -> None:
        if self.netns is None:
            super().server_bind()
            return
        # a socket belongs to the namespace it is created in, and setns applies to
        # the calling thread only: make and bind it in a short-lived thread that
        # entered the namespace; the socket keeps that namespace afterwards
        err: list[BaseException] = []

        def bind() -> None:
            try:
                from pyroute2.netns import setns

                fd = os.open(str(self.netns), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    setns(fd, flags=0)
                finally:
                    os.close(fd)
                self.socket.close()
                self.socket = socket.socket(self.address_family, self.socket_type)
                super(_Server, self).server_bind()
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller below
                err.append(exc)

        t = threading.Thread(target=bind, name="fakellm-bind")
        t.start()
        t.join()
        if err:
            raise err[0]

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client hanging up mid-stream is normal (a CLI killed by a budget stop)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    server_version = "corral-fakellm/1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # every method goes through one place
    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_OPTIONS(self) -> None:
        self._serve()

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537).strip():
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def _serve(self) -> None:
        owner = self.server.owner
        parts = urlsplit(self.path)
        body = self._read_body()
        rec = RecordedRequest(method=self.command, path=parts.path, query=parts.query,
                              headers={k.lower(): v for k, v in self.headers.items()},
                              body=body)
        owner._received(rec)
        path = parts.path.rstrip("/")
        if path.startswith("/v1/"):
            path = path[3:]
        api = _ROUTES.get(path) if self.command == "POST" else None
        try:
            if api is not None:
                rec.api = api
                self._model_call(owner, rec, api)
            elif self.command == "POST" and path == "/messages/count_tokens":
                self._json(rec, 200, anthropic.count_tokens(len(body)))
            elif path in ("/models", ""):
                models = sorted({"fake-model"} | {
                    r.match.model for r in owner.script.rules if r.match.model})
                self._json(rec, 200, {"object": "list", "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "corral"}
                    for m in models]} if path else {"ok": True, "server": "corral-fakellm"})
            else:
                self._json(rec, 404, {"error": {"type": "not_found_error",
                                                "message": f"no route {self.command} "
                                                f"{parts.path}"}})
        finally:
            owner._recorded(rec)

    def _model_call(self, owner: FakeLLM, rec: RecordedRequest, api: str) -> None:
        render_error = {"anthropic": anthropic.error, "responses": responses.error,
                        "chat": chat.error}[api]
        body = conversation.parse_body(rec.body)
        if body is None:
            self._json(rec, 400, render_error(400, "the request body is not a JSON object"))
            return
        if owner.api_key is not None and rec.api_key != owner.api_key:
            self._json(rec, 401, render_error(401, "invalid x-api-key"))
            return
        conv = conversation.read(api, body,  # type: ignore[arg-type]
                                 tuple(owner.script.replay))
        choice = owner.script.choose(conv.prompts, api, conv.model)
        rec.rule, rec.turn = choice.rule, choice.turn
        try:
            reply = actions.build(choice.value, conv, owner.script, len(rec.body))
        except ValueError as exc:
            self._json(rec, 500, render_error(500, f"fake model script: {exc}"))
            return
        if reply.delay:
            time.sleep(reply.delay)
        if reply.status is not None:
            doc = reply.error_body if reply.error_body is not None else render_error(
                reply.status, reply.error or f"scripted error {reply.status}", reply.error_type)
            self._json(rec, reply.status, doc, headers=reply.headers)
            return
        rec.usage = (reply.input_tokens, reply.output_tokens)
        rid = uuid.uuid4().hex
        model = conv.model or "fake-model"
        if not conv.stream:
            if api == "anthropic":
                doc = anthropic.message(reply, model, rid)
            elif api == "responses":
                doc = responses.response(reply, model, rid)
            else:
                doc = chat.completion(reply, model, rid)
            self._json(rec, 200, doc)
            return
        if api == "anthropic":
            events = anthropic.stream(reply, model, rid)
        elif api == "responses":
            events = responses.stream(reply, model, rid)
        else:
            events = chat.stream(reply, model, rid, usage_chunk=owner.usage_chunk)
        self._sse(rec, events)

    def _json(self, rec: RecordedRequest, status: int, doc: dict[str, Any],
              headers: dict[str, str] | None = None) -> None:
        data = json.dumps(doc).encode()
        rec.status = status
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if status == 429 and "retry-after" not in {k.lower() for k in headers or {}}:
            self.send_header("retry-after", "1")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _sse(self, rec: RecordedRequest, events: Iterable[bytes]) -> None:
        rec.status = 200
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        with contextlib.suppress(OSError):
            for ev in events:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
