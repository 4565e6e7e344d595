"""Secrets by sentinel: the sandbox sees a stand-in, the proxy swaps in the real value.

    broker = Broker.from_policy(policy, sandbox_id, key=sentinel_key(home))
    env = broker.sentinels()                      # {"GITHUB_TOKEN": "corral_...", ...}
    rw = broker.rewrite("api.github.com", headers, "/user?x=1")
    if rw.blocked: deny and audit "secret.exfiltration_blocked" (name rw.blocked)
    else: forward rw.headers / rw.target; audit "secret.injected" for rw.injected
    scrub = broker.scrubber()                     # per response: feed()/flush()

Real values are read once (``env:``, ``file:``, ``command:``) and kept only in
this object; no method logs or returns them, and ``repr`` hides them. A sentinel
is ``corral_`` plus random base32, as long as the real value when that is 24
characters or more (so swapping it never changes a Content-Length); with a
``key`` it is derived from the key, the sandbox id and the secret's name, so a
restarted proxy recognizes the sentinels a running sandbox already holds.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import re
import secrets as _random
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote, quote_plus

from corral.errors import ConfigError
from corral.security.policy import Policy, SecretSpec, host_matches
from corral.security.types import Rewrite

__all__ = ["Broker", "SecretError", "StreamScrubber", "resolve_source", "sentinel_key"]

SENTINEL_PREFIX = "corral_"
_MIN_LEN = 24
_MAX_LEN = 512
_B32 = "abcdefghijklmnopqrstuvwxyz234567"
_BASIC = re.compile(r"^(\s*basic\s+)(\S+)(\s*)$", re.IGNORECASE)
_AUTH_HEADERS = ("authorization", "proxy-authorization")


class SecretError(ConfigError):
    """A secret's source cannot be read; the message never contains the value."""


def resolve_source(name: str, source: str, *, timeout: float = 30.0) -> str:
    """The real value of one secret. Raises ``SecretError`` (one line, no value).

    Trailing newlines are stripped; a value with a control character inside is
    refused (it could split a header)."""
    kind, _, arg = source.partition(":")
    if kind == "env":
        value = os.environ.get(arg)
        if value is None:
            raise SecretError(f"secret {name}: environment variable {arg} is not set")
    elif kind == "file":
        path = Path(arg).expanduser()
        try:
            value = path.read_text()
        except OSError as exc:
            raise SecretError(f"secret {name}: cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise SecretError(f"secret {name}: {path} is not text") from None
    elif kind == "command":
        try:
            r = subprocess.run(shlex.split(arg), capture_output=True, text=True,
                               timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        except (OSError, ValueError) as exc:
            raise SecretError(f"secret {name}: cannot run `{arg}`: {exc}") from None
        except subprocess.TimeoutExpired:
            raise SecretError(f"secret {name}: `{arg}` did not finish in {timeout:g}s"
                              ) from None
        if r.returncode != 0:
            raise SecretError(f"secret {name}: `{arg}` failed with exit {r.returncode}")
        value = r.stdout
    else:
        raise SecretError(f"secret {name}: unknown source {kind!r}")
    value = value.rstrip("\r\n")
    if not value:
        raise SecretError(f"secret {name}: the value from {kind}: is empty")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise SecretError(f"secret {name}: the value contains a control character")
    if len(value) > 16384:
        raise SecretError(f"secret {name}: the value is longer than 16 KiB")
    return value


#: length of the installation's sentinel key, in bytes
KEY_BYTES = 32


def sentinel_key(home: Path) -> bytes:
    """The installation's sentinel key (``$CORRAL_HOME/secrets/sentinel.key``, 0600).

    Made on first use, safely against concurrent first uses in several threads and
    processes: the key is written whole to a private temporary file that is then
    *linked* to its name, so a reader sees either no key or the whole key (never
    an empty file that another creator has not written yet; sentinels derived
    from that would not be the ones the proxy recognizes). Raises ``SecretError``
    for a key file that is damaged (wrong length)."""
    d = home / "secrets"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = d / "sentinel.key"
    try:
        return _checked_key(path, path.read_bytes())
    except FileNotFoundError:
        pass
    tmp = d / f".sentinel.key.{os.getpid()}.{_random.token_hex(8)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_random.token_bytes(KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # another creator won: use theirs
            os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return _checked_key(path, path.read_bytes())


def _checked_key(path: Path, key: bytes) -> bytes:
    if len(key) != KEY_BYTES:
        raise SecretError(f"the sentinel key {path} is damaged ({len(key)} bytes, expected "
                          f"{KEY_BYTES}); remove it (running fenced sandboxes then need "
                          "to be created again)")
    return key


def _sentinel(length: int, key: bytes | None, sandbox_id: str, name: str) -> str:
    n = max(_MIN_LEN, min(length, _MAX_LEN)) - len(SENTINEL_PREFIX)
    if key is None:
        body = "".join(_random.choice(_B32) for _ in range(n))
    else:
        stream = b""
        counter = 0
        while len(stream) * 8 // 5 < n:
            msg = f"{sandbox_id}\0{name}\0{counter}".encode()
            stream += hmac.new(key, msg, hashlib.sha256).digest()
            counter += 1
        body = base64.b32encode(stream).decode().lower().rstrip("=")[:n]
    return SENTINEL_PREFIX + body


class _Secret:
    __slots__ = ("hosts", "name", "real", "sentinel")

    def __init__(self, name: str, real: str, sentinel: str, hosts: Sequence[str]) -> None:
        self.name, self.real, self.sentinel, self.hosts = name, real, sentinel, tuple(hosts)

    def __repr__(self) -> str:
        return f"<secret {self.name} hosts={list(self.hosts)}>"


class Broker:
    """The ``SecretBroker`` of one sandbox (see ``types.SecretBroker``)."""

    def __init__(self, sandbox_id: str, values: Mapping[str, tuple[str, Sequence[str]]], *,
                 key: bytes | None = None) -> None:
        """``values``: name -> (real value, host patterns). Prefer ``from_policy``."""
        self.sandbox_id = sandbox_id
        self._secrets = [_Secret(n, real, _sentinel(len(real), key, sandbox_id, n), hosts)
                         for n, (real, hosts) in values.items()]
        self._by_sentinel = {s.sentinel: s for s in self._secrets}
        self._find = (re.compile("|".join(re.escape(s) for s in self._by_sentinel))
                      if self._secrets else None)
        self._scrub_pairs = _scrub_pairs(self._secrets)

    @classmethod
    def from_policy(cls, policy: Policy, sandbox_id: str, *, key: bytes | None = None
                    ) -> Broker:
        """Resolve every secret of ``policy`` now (commands run once). Raises SecretError."""
        values = {name: (resolve_source(name, spec.source), spec.hosts)
                  for name, spec in policy.secrets.items()}
        return cls(sandbox_id, values, key=key)

    @classmethod
    def from_specs(cls, specs: Mapping[str, SecretSpec], sandbox_id: str, *,
                   key: bytes | None = None) -> Broker:
        values = {n: (resolve_source(n, s.source), s.hosts) for n, s in specs.items()}
        return cls(sandbox_id, values, key=key)

    def __repr__(self) -> str:
        return f"<Broker sandbox={self.sandbox_id} secrets={self.names()}>"

    def names(self) -> list[str]:
        return [s.name for s in self._secrets]

    def sentinels(self) -> dict[str, str]:
        """Secret name -> the sentinel the sandbox sees (put these in its environment)."""
        return {s.name: s.sentinel for s in self._secrets}

    def hosts(self, name: str) -> tuple[str, ...]:
        return next(s.hosts for s in self._secrets if s.name == name)

    # -- requests --------------------------------------------------------------

    def rewrite(self, host: str, headers: Sequence[tuple[str, str]], target: str) -> Rewrite:
        """Swap sentinels for real values, or report one headed to an unbound host.

        Looks in every header value, inside ``Basic`` credentials, and in the
        target (swapped only in the query; a sentinel in the path is left as is
        for bound hosts). ``host`` is the canonical host the request goes to."""
        if self._find is None:
            return Rewrite(headers=tuple(headers), target=target)
        used: dict[str, _Secret] = {}
        for s in self._sentinels_in(headers, target):
            used[s.name] = s
        for s in used.values():
            if not any(host_matches(p, host) for p in s.hosts):
                return Rewrite(headers=tuple(headers), target=target, blocked=s.name)
        if not used:
            return Rewrite(headers=tuple(headers), target=target)
        new_headers = tuple((k, self._swap_header(k, v)) for k, v in headers)
        path, sep, query = target.partition("?")
        if sep:
            query = self._find.sub(lambda m: quote(self._by_sentinel[m.group(0)].real, safe=""),
                                   query)
        return Rewrite(headers=new_headers, target=path + sep + query,
                       injected=tuple(sorted(used)))

    def _sentinels_in(self, headers: Sequence[tuple[str, str]], target: str) -> list[_Secret]:
        assert self._find is not None
        found = [self._by_sentinel[m.group(0)] for m in self._find.finditer(target)]
        for k, v in headers:
            found += [self._by_sentinel[m.group(0)] for m in self._find.finditer(v)]
            if k.lower() in _AUTH_HEADERS:
                decoded = _basic_decode(v)
                if decoded is not None:
                    found += [self._by_sentinel[m.group(0)]
                              for m in self._find.finditer(decoded)]
        return found

    def _swap_header(self, name: str, value: str) -> str:
        assert self._find is not None
        if name.lower() in _AUTH_HEADERS:
            m = _BASIC.match(value)
            decoded = _basic_decode(value)
            if m and decoded is not None and self._find.search(decoded):
                swapped = self._find.sub(lambda x: self._by_sentinel[x.group(0)].real, decoded)
                enc = base64.b64encode(swapped.encode("utf-8")).decode("ascii")
                return m.group(1) + enc + m.group(3)
        return self._find.sub(lambda x: self._by_sentinel[x.group(0)].real, value)

    # -- responses -------------------------------------------------------------

    def scrubber(self) -> StreamScrubber:
        """A fresh scrubber for one response body."""
        return StreamScrubber(self._scrub_pairs)

    def scrub_text(self, text: str) -> str:
        """``text`` with every real value (and its encodings) replaced by its sentinel:
        for response headers, and for anything about to be logged."""
        if not self._scrub_pairs:
            return text
        return StreamScrubber(self._scrub_pairs).scrub_all(
            text.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")


def _basic_decode(value: str) -> str | None:
    m = _BASIC.match(value)
    if not m:
        return None
    try:
        return base64.b64decode(m.group(2), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None


def _scrub_pairs(secrets: Sequence[_Secret]) -> list[tuple[bytes, bytes]]:
    """(needle, replacement) byte pairs: the raw value, its URL encodings and the
    base64 of it at each of the three alignments (the part that depends on the
    value alone)."""
    pairs: dict[bytes, bytes] = {}
    for s in secrets:
        real, sent = s.real.encode(), s.sentinel.encode()
        pairs[real] = sent
        for enc in (quote(s.real, safe=""), quote_plus(s.real, safe="")):
            if enc.encode() != real:
                pairs[enc.encode()] = sent
        if len(real) >= 12:
            for shift in range(3):
                pad = b"\0" * shift
                r64 = base64.b64encode(pad + real)
                s64 = base64.b64encode(pad + sent)
                # characters fully determined by the value's bytes
                start = (shift * 8 + 5) // 6
                end = ((shift + len(real)) * 8) // 6
                needle = r64[start:end]
                if len(needle) >= 8:
                    send = ((shift + len(sent)) * 8) // 6
                    pairs[needle] = s64[start:send]
    return sorted(pairs.items(), key=lambda p: -len(p[0]))


class StreamScrubber:
    """Replaces real secret values in a byte stream, across chunk boundaries.

    Holds back ``len(longest needle) - 1`` bytes between ``feed`` calls; ``flush``
    returns the rest. Output length equals input length when every secret is at
    least 24 characters long (the sentinel then has the same length)."""

    def __init__(self, pairs: Sequence[tuple[bytes, bytes]]) -> None:
        self._map = dict(pairs)
        self._rx = re.compile(b"|".join(re.escape(p) for p, _ in pairs)) if pairs else None
        self._hold = max((len(p) for p, _ in pairs), default=1) - 1
        self._buf = b""
        # a few substring searches beat one regex alternation by 3-4x on clean data
        self._needles = [p for p, _ in pairs] if len(pairs) <= 8 else None

    def feed(self, data: bytes) -> bytes:
        if self._rx is None:
            return data
        buf = self._buf + data
        limit = len(buf) - self._hold
        if self._needles is not None and not any(n in buf for n in self._needles):
            cut = max(limit, 0)
            self._buf = buf[cut:]
            return buf[:cut]
        out = bytearray()
        pos = 0
        for m in self._rx.finditer(buf):
            if m.start() >= limit:
                break
            out += buf[pos : m.start()] + self._map[m.group(0)]
            pos = m.end()
        cut = max(limit, pos)
        out += buf[pos:cut]
        self._buf = buf[cut:]
        return bytes(out)

    def flush(self) -> bytes:
        buf, self._buf = self._buf, b""
        return self.scrub_all(buf)

    def scrub_all(self, data: bytes) -> bytes:
        if self._rx is None:
            return data
        return self._rx.sub(lambda m: self._map[m.group(0)], data)
