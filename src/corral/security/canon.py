"""Canonical hosts, paths and requests: what the policy matches is what goes upstream.

The proxy calls ``check_request`` with the request line and headers exactly as
they arrived (h11 has already split them). It returns either a
``CanonicalRequest`` (the proxy forwards ``method``/``target``/``headers`` of
that object, never the original bytes) or a ``Rejected`` whose ``reason`` is the
body of the 403. Anything two servers could read two ways is rejected rather
than guessed: encoded ``/`` or ``\\``, NUL and control characters, ``;`` path
parameters, double encoding, an absolute-form target that disagrees with
``Host``, two ``Host`` headers, and Content-Length / Transfer-Encoding
combinations that allow request smuggling.

Hosts are canonical as lowercase IDNA (punycode) without a trailing dot; IP
literals are normalized by ``ipaddress`` and IPv6 is kept *without* brackets
(``format_authority`` adds them back).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import idna

from corral.security.types import RefUpdate, RequestView

__all__ = [
    "RELAX_ENCODED_SLASH",
    "RELAX_SEMICOLON",
    "CanonicalRequest",
    "InvalidHost",
    "InvalidPath",
    "Rejected",
    "canonical_host",
    "canonical_path",
    "check_connect",
    "check_request",
    "default_port",
    "format_authority",
    "split_authority",
]

#: relaxations a policy can grant per host (``network.allow_encoded_slash`` / ``allow_semicolon``)
RELAX_ENCODED_SLASH = "encoded_slash"
RELAX_SEMICOLON = "semicolon"

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
#: characters a path may carry unencoded (RFC 3986 pchar minus '%', plus '/')
_PATH_RAW = _UNRESERVED | frozenset(b"!$&'()*+,;=:@/")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_LABEL = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")
_PORT = re.compile(r"^[0-9]{1,5}$")


class InvalidHost(ValueError):
    """A host that is not a DNS name or an IP literal in its one canonical form."""


class InvalidPath(ValueError):
    """A path that is ambiguous or malformed; the message is written for the agent."""


@dataclass(frozen=True)
class Rejected:
    """An ambiguous or malformed request: deny it with ``reason`` (a 403 or 400 body)."""

    reason: str

    @property
    def allowed(self) -> bool:
        return False


@dataclass(frozen=True)
class CanonicalRequest:
    """A request in its one canonical form: check it, then forward exactly this."""

    method: str
    scheme: Literal["http", "https"]
    host: str
    port: int
    path: str
    #: raw query without "?" ("" when none); validated, never rewritten
    query: str
    #: the headers as received, minus nothing: Host is one, CL/TE are consistent
    headers: tuple[tuple[str, str], ...]
    #: how the body is framed: none, a fixed length, or chunked
    body: Literal["none", "length", "chunked"]
    content_length: int | None = None

    @property
    def target(self) -> str:
        """The origin-form request target to send upstream."""
        return self.path + ("?" + self.query if self.query else "")

    @property
    def authority(self) -> str:
        return format_authority(self.host, self.port, self.scheme)

    def view(self, sandbox_id: str, *, task_id: str | None = None,
             git_updates: Sequence[RefUpdate] = ()) -> RequestView:
        """The ``RequestView`` the policy engine decides on."""
        return RequestView(sandbox_id=sandbox_id, scheme=self.scheme, host=self.host,
                           port=self.port, method=self.method, path=self.path,
                           query=self.query, headers=self.headers,
                           git_updates=tuple(git_updates), task_id=task_id)


def default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def format_authority(host: str, port: int, scheme: str | None = None) -> str:
    """``host:port`` with IPv6 in brackets; the port is left out when it is the default."""
    h = f"[{host}]" if ":" in host else host
    if scheme is not None and port == default_port(scheme):
        return h
    return f"{h}:{port}"


# -- hosts -------------------------------------------------------------------


def canonical_host(raw: str) -> str:
    """The canonical form of a host name or IP literal. Raises ``InvalidHost``.

    Lowercase, IDNA 2008 (UTS 46 mapping) to punycode, one trailing dot removed,
    IPv4 in dotted quad, IPv6 compressed without brackets. Numeric forms that
    some resolvers read as IPv4 (``127.1``, ``0x7f.0.0.1``, ``2130706433``,
    leading zeros) are rejected instead of guessed.
    """
    if not isinstance(raw, str) or not raw:
        raise InvalidHost("empty host")
    if len(raw) > 300:
        raise InvalidHost("host name too long")
    s = raw
    if s.startswith("["):
        if not s.endswith("]"):
            raise InvalidHost(f"unterminated IPv6 literal: {raw!r}")
        return _ipv6(s[1:-1], raw)
    if ":" in s:
        return _ipv6(s, raw)
    if any(ord(c) < 0x21 or c in "\x7f/\\?#@%[]" for c in s):
        raise InvalidHost(f"invalid character in host {raw!r}")
    if s.endswith("."):
        s = s[:-1]
    if not s or s.endswith("."):
        raise InvalidHost(f"empty label in host {raw!r}")
    if s.isascii():
        s = s.lower()
    else:
        try:
            s = idna.encode(s, uts46=True, transitional=False).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError) as exc:
            raise InvalidHost(f"not a valid international host name {raw!r}: {exc}") from None
        s = s.removesuffix(".")
    labels = s.split(".")
    if _NUMERIC_LABEL.match(labels[-1]):
        try:
            return str(ipaddress.IPv4Address(s))
        except ValueError:
            raise InvalidHost(f"numeric host {raw!r} is not a dotted-quad IPv4 address"
                              ) from None
    if len(s) > 253:
        raise InvalidHost("host name too long")
    for label in labels:
        if not _LABEL.match(label):
            raise InvalidHost(f"invalid label {label!r} in host {raw!r}")
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except (idna.IDNAError, UnicodeError, ValueError):
                raise InvalidHost(f"invalid punycode label {label!r} in host {raw!r}"
                                  ) from None
    return s


def _ipv6(text: str, raw: str) -> str:
    if "%" in text:
        raise InvalidHost(f"IPv6 zone ids are not allowed: {raw!r}")
    try:
        return ipaddress.IPv6Address(text).compressed
    except ValueError:
        raise InvalidHost(f"invalid IPv6 address {raw!r}") from None


def split_authority(auth: str) -> tuple[str, int | None]:
    """``host[:port]`` (IPv6 in brackets) -> (host text, port or None). Raises InvalidHost."""
    if "@" in auth:
        raise InvalidHost("credentials in the URL authority are not allowed")
    if auth.startswith("["):
        end = auth.find("]")
        if end < 0:
            raise InvalidHost(f"unterminated IPv6 literal in {auth!r}")
        host, rest = auth[: end + 1], auth[end + 1 :]
        if rest and not rest.startswith(":"):
            raise InvalidHost(f"junk after IPv6 literal in {auth!r}")
        port_text = rest[1:] if rest else None
    elif ":" in auth:
        host, _, port_text = auth.rpartition(":")
        if ":" in host:
            raise InvalidHost(f"IPv6 literal must be in brackets: {auth!r}")
    else:
        host, port_text = auth, None
    if port_text is None:
        return host, None
    if not _PORT.match(port_text) or not 0 < int(port_text) < 65536:
        raise InvalidHost(f"invalid port in {auth!r}")
    return host, int(port_text)


def check_connect(target: str) -> tuple[str, int]:
    """The canonical ``(host, port)`` of a CONNECT target (``host:port``; port required).

    Raises ``InvalidHost``."""
    host, port = split_authority(target)
    if port is None:
        raise InvalidHost(f"CONNECT target {target!r} has no port")
    return canonical_host(host), port


# -- paths -------------------------------------------------------------------


def canonical_path(raw: str, relax: Iterable[str] = ()) -> str:
    """The canonical form of a request path. Raises ``InvalidPath``.

    Percent-escapes of unreserved characters are decoded, the others written in
    uppercase hex; characters that may not appear raw are encoded; dot segments
    are resolved (never above the root); ``//`` is collapsed. Encoded ``/`` or
    ``\\`` (unless ``relax`` has ``encoded_slash``), ``;`` (unless ``semicolon``),
    backslashes, control characters and double encoding are rejected.
    """
    relaxed = frozenset(relax)
    if not raw.startswith("/"):
        raise InvalidPath("the request path must start with '/'")
    data = raw.encode("utf-8", "surrogatepass")
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b == 0x25:  # '%'
            if i + 2 >= n:
                raise InvalidPath("a truncated percent-escape in the path")
            h1, h2 = data[i + 1], data[i + 2]
            if h1 not in _HEX or h2 not in _HEX:
                raise InvalidPath("an invalid percent-escape in the path")
            v = int(bytes((h1, h2)), 16)
            if v < 0x20 or v == 0x7F:
                raise InvalidPath("an encoded control character (such as %00) in the path")
            if v == 0x2F and RELAX_ENCODED_SLASH not in relaxed:
                raise InvalidPath("an encoded '/' (%2F) in the path is ambiguous")
            if v == 0x5C:
                raise InvalidPath("an encoded '\\' (%5C) in the path is ambiguous")
            if v == 0x25 and i + 4 < n and data[i + 3] in _HEX and data[i + 4] in _HEX:
                raise InvalidPath("a double-encoded escape (%25XX) in the path is ambiguous")
            if v == 0x3B and RELAX_SEMICOLON not in relaxed:
                raise InvalidPath("an encoded ';' (%3B) in the path is ambiguous")
            if v in _UNRESERVED:
                out.append(v)
            else:
                out += b"%%%02X" % v
            i += 3
            continue
        if b < 0x20 or b == 0x7F:
            raise InvalidPath("a control character in the path")
        if b == 0x5C:
            raise InvalidPath("a backslash in the path is ambiguous")
        if b == 0x3B and RELAX_SEMICOLON not in relaxed:
            raise InvalidPath("';' path parameters are ambiguous")
        if b in (0x3F, 0x23):
            raise InvalidPath("'?' or '#' inside the path")
        if b in _PATH_RAW:
            out.append(b)
        else:
            out += b"%%%02X" % b
        i += 1
    return _remove_dots(out.decode("ascii"))


def _remove_dots(path: str) -> str:
    """Resolve '.' and '..' (clamped at the root) and drop empty segments."""
    segments = path.split("/")[1:]
    stack: list[str] = []
    for seg in segments:
        if seg in ("", "."):
            continue
        if seg == "..":
            if stack:
                stack.pop()
            continue
        stack.append(seg)
    trailing = segments[-1] in ("", ".", "..") and bool(stack)
    return "/" + "/".join(stack) + ("/" if trailing else "")


def _check_query(query: str) -> str | None:
    """A reason to reject the query, or None. The query is forwarded as is."""
    for c in query:
        o = ord(c)
        if o < 0x21 or o == 0x7F:
            return "a control character or space in the query"
        if c == "#":
            return "a fragment ('#') in the request target"
        if o > 0x7E:
            return "a raw non-ASCII character in the query"
    for m in re.finditer(r"%(..)?", query):
        esc = m.group(1)
        if esc is None or not all(ch in "0123456789abcdefABCDEF" for ch in esc):
            return "an invalid percent-escape in the query"
        if int(esc, 16) == 0:
            return "an encoded NUL (%00) in the query"
    return None


# -- whole requests -----------------------------------------------------------


def _s(v: str | bytes) -> str:
    return v.decode("latin-1") if isinstance(v, bytes) else v


def check_request(
    method: str | bytes,
    target: str | bytes,
    headers: Iterable[tuple[str | bytes, str | bytes]],
    *,
    scheme: Literal["http", "https"] = "http",
    authority: tuple[str, int] | None = None,
    http_version: str = "1.1",
    relax: Callable[[str], Iterable[str]] | None = None,
) -> CanonicalRequest | Rejected:
    """Validate and canonicalize one request; never raises for bad input.

    ``authority`` is the destination already fixed by the connection (the
    CONNECT target or the transparent destination): the Host header and an
    absolute-form target must name it. ``relax(host)`` returns the path
    relaxations the policy grants that host (see ``Engine.path_relaxations``).
    """
    meth = _s(method)
    if not _TOKEN.match(meth):
        return Rejected("the request method is not a valid token")
    meth = meth.upper()
    if meth in ("TRACE", "TRACK"):
        return Rejected(f"{meth} is denied: it echoes the request (and its credentials) back")
    if meth == "CONNECT":
        return Rejected("CONNECT is only valid as the first request to the proxy")
    hdrs = tuple((_s(k), _s(v)) for k, v in headers)
    bad = _check_headers(hdrs)
    if bad:
        return Rejected(bad)
    tgt = _s(target)
    hosts = [v.strip() for k, v in hdrs if k.lower() == "host"]
    if len(hosts) > 1:
        return Rejected("more than one Host header")
    try:
        req_scheme, host, port, raw_path = _parse_target(tgt, scheme)
        if hosts:
            h_host, h_port = split_authority(hosts[0])
            h_host = canonical_host(h_host)
            h_port = h_port if h_port is not None else default_port(req_scheme)
            if host is None:
                host, port = h_host, h_port
            elif (h_host, h_port) != (host, port):
                return Rejected(f"the target names {format_authority(host, port)} but the "
                                f"Host header names {format_authority(h_host, h_port)}")
        elif http_version != "1.0":
            return Rejected("the Host header is missing")
        if authority is not None:
            a_host, a_port = canonical_host(authority[0]), authority[1]
            if host is None:
                host, port = a_host, a_port
            elif (host, port) != (a_host, a_port):
                return Rejected(f"the request names {format_authority(host, port)} but the "
                                f"connection goes to {format_authority(a_host, a_port)} "
                                "(domain fronting is not allowed)")
        if host is None:
            return Rejected("the request does not name a host")
    except InvalidHost as exc:
        return Rejected(str(exc))
    path_text, _, query = raw_path.partition("?")
    try:
        path = canonical_path(path_text, relax(host) if relax else ())
    except InvalidPath as exc:
        return Rejected(str(exc))
    qbad = _check_query(query)
    if qbad:
        return Rejected(qbad)
    framing = _framing(hdrs)
    if isinstance(framing, Rejected):
        return framing
    body, length = framing
    return CanonicalRequest(method=meth, scheme=req_scheme, host=host, port=port, path=path,
                            query=query, headers=hdrs, body=body, content_length=length)


def _parse_target(tgt: str, scheme: Literal["http", "https"]
                  ) -> tuple[Literal["http", "https"], str | None, int, str]:
    """-> (scheme, canonical host or None, port, path-and-query). Raises InvalidHost."""
    if "#" in tgt:
        raise InvalidHost("a fragment ('#') in the request target")
    if tgt.startswith("/"):
        return scheme, None, default_port(scheme), tgt
    low = tgt[:8].lower()
    if low.startswith("http://") or low.startswith("https://"):
        req_scheme: Literal["http", "https"] = "https" if low.startswith("https") else "http"
        rest = tgt.split("://", 1)[1]
        cut = min((p for p in (rest.find("/"), rest.find("?")) if p >= 0), default=len(rest))
        auth, path = rest[:cut], rest[cut:]
        if not path.startswith("/"):
            path = "/" + path
        h, p = split_authority(auth)
        return req_scheme, canonical_host(h), p if p is not None else default_port(
            req_scheme), path
    raise InvalidHost("the request target must be a path or an http(s) URL")


def _check_headers(hdrs: Sequence[tuple[str, str]]) -> str | None:
    for k, v in hdrs:
        if not _TOKEN.match(k):
            return f"invalid header name {k[:40]!r}"
        if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in v):
            return f"a control character in the {k} header"
    return None


def _framing(hdrs: Sequence[tuple[str, str]]
             ) -> tuple[Literal["none", "length", "chunked"], int | None] | Rejected:
    """Body framing from CL / TE, rejecting every combination two parsers could split."""
    cls = [v.strip() for k, v in hdrs if k.lower() == "content-length"]
    tes = [v.strip() for k, v in hdrs if k.lower() == "transfer-encoding"]
    if tes and cls:
        return Rejected("both Content-Length and Transfer-Encoding (request smuggling)")
    if tes:
        if len(tes) > 1 or tes[0].lower() != "chunked":
            return Rejected("Transfer-Encoding other than a single 'chunked' is not accepted")
        return "chunked", None
    if cls:
        values = {p.strip() for v in cls for p in v.split(",")}
        if len(values) != 1:
            return Rejected("conflicting Content-Length headers (request smuggling)")
        (only,) = values
        if not only.isdigit() or not only.isascii() or len(only) > 18:
            return Rejected("an invalid Content-Length")
        n = int(only)
        return ("length" if n else "none"), n
    return "none", None
