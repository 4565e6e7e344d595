"""Git smart HTTP: find the ref updates of a ``git push`` so rules can decide per ref.

A push is ``POST <repo>/git-receive-pack`` whose body starts with pkt-lines::

    00XX<old-oid> <new-oid> <ref>\\0<capabilities>\\n   first command
    00XX<old-oid> <new-oid> <ref>\\n                    more commands
    0000                                               flush
    [push options ... 0000]  PACK...                   (not read here)

The proxy feeds the body to a ``ReceivePackHead`` as it arrives, keeps the bytes,
and decides once ``feed`` returns True; it then forwards everything it kept.
Anything that is not exactly this shape (truncated, garbled, oversized, signed
pushes) is an ``error``, and the proxy denies the push.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable

from corral.security.types import RefUpdate

__all__ = [
    "RECEIVE_PACK_CONTENT_TYPE",
    "GitProtocolError",
    "ReceivePackHead",
    "is_receive_pack_discovery",
    "is_receive_pack_request",
    "parse_ref_updates",
]

RECEIVE_PACK_CONTENT_TYPE = "application/x-git-receive-pack-request"
#: the command list of a push is small; more than this before the flush is an attack
MAX_HEAD_BYTES = 4 << 20
_OID = r"(?:[0-9a-f]{40}|[0-9a-f]{64})"
_COMMAND = re.compile(rf"^({_OID}) ({_OID}) (refs/[\x21-\x7e]+|HEAD)$")
_SHALLOW = re.compile(rf"^shallow {_OID}$")


class GitProtocolError(ValueError):
    """The body of a receive-pack request is not a well-formed command list."""


def is_receive_pack_request(method: str, path: str) -> bool:
    """Whether a request is a push (``POST .../git-receive-pack``).

    Decided on method and path alone, so a wrong Content-Type cannot hide a push
    from the parser (git http-backend refuses such a request anyway)."""
    return method.upper() == "POST" and path.endswith("/git-receive-pack")


def is_receive_pack_discovery(method: str, path: str, query: str) -> bool:
    """Whether a request is the ref advertisement that starts a push
    (``GET .../info/refs?service=git-receive-pack``)."""
    return (method.upper() in ("GET", "HEAD") and path.endswith("/info/refs")
            and "service=git-receive-pack" in query.split("&"))


class ReceivePackHead:
    """Incremental parser of the command list at the start of a receive-pack body.

    ``feed`` returns True once the list is complete or broken; then read
    ``updates`` or ``error``. Call ``finish`` at the end of the body: a body that
    ended before the flush packet is an error. ``content_encoding`` may be
    ``gzip`` or ``deflate`` (git itself sends receive-pack bodies uncompressed).
    """

    def __init__(self, content_encoding: str | None = None, *,
                 max_bytes: int = MAX_HEAD_BYTES) -> None:
        self.error: str | None = None
        self.done = False
        self._inflate: zlib._Decompress | None = None
        enc = (content_encoding or "identity").strip().lower()
        if enc in ("gzip", "x-gzip", "deflate"):
            self._inflate = zlib.decompressobj(47)  # 32 + 15: zlib or gzip header
        elif enc != "identity":
            self._fail(f"unsupported Content-Encoding {enc!r} on a git push")
        self._buf = bytearray()
        self._max = max_bytes
        self._seen = 0
        self._commands: list[RefUpdate] = []
        self.capabilities: frozenset[str] = frozenset()

    @property
    def updates(self) -> tuple[RefUpdate, ...]:
        """The ref updates, once ``done`` without ``error``."""
        return tuple(self._commands) if self.done and not self.error else ()

    def feed(self, data: bytes) -> bool:
        """Add body bytes; True once the command list is complete (or broken)."""
        if self.done:
            return True
        if self._inflate is not None:
            try:
                data = self._inflate.decompress(data, self._max)
            except zlib.error:
                return self._fail("the compressed push body is corrupt")
        self._seen += len(data)
        if self._seen > self._max:
            return self._fail("the command list of the push is too large")
        self._buf += data
        return self._parse()

    def finish(self) -> bool:
        """The body ended: complete, or an error if the flush packet never came."""
        if not self.done:
            self._fail("the push body ended before the end of its command list")
        return True

    def _fail(self, message: str) -> bool:
        self.error = message
        self.done = True
        return True

    def _parse(self) -> bool:
        buf = self._buf
        pos = 0
        while True:
            if len(buf) - pos < 4:
                break
            head = bytes(buf[pos : pos + 4])
            if not re.fullmatch(rb"[0-9a-fA-F]{4}", head):
                return self._fail(f"bad pkt-line length {head!r}")
            size = int(head, 16)
            if size == 0:
                self.done = True  # an empty command list is legal (nothing to update)
                del buf[: pos + 4]
                return True
            if size < 4 or size > 65520:
                return self._fail(f"bad pkt-line length {head!r}")
            if len(buf) - pos < size:
                break
            line = bytes(buf[pos + 4 : pos + size])
            pos += size
            err = self._line(line)
            if err:
                return self._fail(err)
        del buf[:pos]
        return False

    def _line(self, line: bytes) -> str | None:
        if line.endswith(b"\n"):
            line = line[:-1]
        first = not self._commands
        if first and b"\0" in line:
            line, _, caps = line.partition(b"\0")
            self.capabilities = frozenset(caps.decode("ascii", "replace").split())
        elif b"\0" in line:
            return "a NUL byte inside a ref-update command"
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            return "a ref name that is not ASCII"
        if text.startswith("push-cert"):
            return "signed pushes (push certificates) are not supported through the proxy"
        if first and _SHALLOW.match(text):
            return None
        m = _COMMAND.match(text)
        if not m:
            return f"not a ref-update command: {text[:80]!r}"
        old, new, ref = m.groups()
        if len(old) != len(new):
            return "object ids of different lengths in one command"
        self._commands.append(RefUpdate(old=old, new=new, ref=ref))
        return None


def parse_ref_updates(body: bytes | Iterable[bytes], content_encoding: str | None = None
                      ) -> tuple[RefUpdate, ...]:
    """All ref updates of a whole receive-pack body. Raises ``GitProtocolError``."""
    head = ReceivePackHead(content_encoding)
    chunks = [body] if isinstance(body, bytes | bytearray) else body
    for chunk in chunks:
        if head.feed(bytes(chunk)):
            break
    head.finish()
    if head.error:
        raise GitProtocolError(head.error)
    return head.updates
