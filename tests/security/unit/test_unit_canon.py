"""Canonical hosts, paths and requests (adversarial input: hypothesis)."""

from __future__ import annotations

from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.security.canon import (
    CanonicalRequest,
    InvalidHost,
    InvalidPath,
    Rejected,
    canonical_host,
    canonical_path,
    check_connect,
    check_request,
    format_authority,
)

# -- hosts --------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "want"), [
    ("Example.COM", "example.com"),
    ("example.com.", "example.com"),
    ("API.GitHub.com.", "api.github.com"),
    ("bücher.de", "xn--bcher-kva.de"),
    ("BÜCHER.de", "xn--bcher-kva.de"),
    ("xn--bcher-kva.de", "xn--bcher-kva.de"),
    ("127.0.0.1", "127.0.0.1"),
    ("[::1]", "::1"),
    ("[0:0:0:0:0:0:0:1]", "::1"),
    ("::FFFF:127.0.0.1", "::ffff:7f00:1"),
    ("[2001:DB8::1]", "2001:db8::1"),
    ("under_score.example", "under_score.example"),
])
def test_canonical_host(raw: str, want: str) -> None:
    assert canonical_host(raw) == want


@pytest.mark.parametrize("raw", [
    "", ".", "a..b", "-a.com", "a-.com", "exa mple.com", "a/b", "a\\b", "a@b", "a%2eb",
    "127.1", "0x7f.0.0.1", "2130706433", "0177.0.0.1", "127.000.0.1", "1.2.3.4.5",
    "[::1", "[fe80::1%eth0]", "fe80::1%25eth0", "xn--zz", "a" * 64 + ".com",
    "[not:an:ip]", "host\x00.com", "*.example.com",
])
def test_canonical_host_rejects_junk(raw: str) -> None:
    with pytest.raises(InvalidHost):
        canonical_host(raw)


@given(st.text(min_size=1, max_size=40))
@settings(max_examples=400)
def test_canonical_host_idempotent(raw: str) -> None:
    try:
        h = canonical_host(raw)
    except InvalidHost:
        return
    assert canonical_host(h) == h
    assert h == h.lower() and not h.endswith(".")
    assert h.isascii()


def test_format_authority() -> None:
    assert format_authority("::1", 443, "https") == "[::1]"
    assert format_authority("::1", 8443) == "[::1]:8443"
    assert format_authority("a.test", 80, "http") == "a.test"


def test_check_connect() -> None:
    assert check_connect("Example.com:443") == ("example.com", 443)
    assert check_connect("[::1]:8443") == ("::1", 8443)
    for bad in ("example.com", "a.com:0", "a.com:99999", "::1:443", "u@a.com:443", "a.com:x"):
        with pytest.raises(InvalidHost):
            check_connect(bad)


# -- paths --------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "want"), [
    ("/", "/"),
    ("/a/b/../c", "/a/c"),
    ("/a/./b", "/a/b"),
    ("/a//b///c", "/a/b/c"),
    ("/../../etc/passwd", "/etc/passwd"),
    ("/%2e%2e/%2E%2e/x", "/x"),
    ("/a/%2e/b", "/a/b"),
    ("/%7Euser/%41", "/~user/A"),
    ("/a%3ab", "/a%3Ab"),
    ("/a%c3%a9", "/a%C3%A9"),
    ("/aé", "/a%C3%A9"),
    ("/a b", "/a%20b"),
    ("/a/", "/a/"),
    ("/a/b/..", "/a/"),
    ("/a/b/.", "/a/b/"),
    ("/..", "/"),
    ("/a%20b", "/a%20b"),
])
def test_canonical_path(raw: str, want: str) -> None:
    assert canonical_path(raw) == want


@pytest.mark.parametrize("raw", [
    "/a%2fb", "/a%2Fb", "/a%5cb", "/a\\b", "/a%00b", "/a\x00b", "/a%0ab", "/a\nb",
    "/a;b", "/..;/admin", "/a%3bb", "/a%zz", "/a%2", "/a%", "/x%252e%252e",
    "relative", "/a?b", "/a#b", "/a%7f",
])
def test_canonical_path_rejects_ambiguous(raw: str) -> None:
    with pytest.raises(InvalidPath):
        canonical_path(raw)


def test_relaxations_keep_escapes_encoded() -> None:
    assert canonical_path("/@types%2fnode", ["encoded_slash"]) == "/@types%2Fnode"
    assert canonical_path("/a;v=1/b", ["semicolon"]) == "/a;v=1/b"
    with pytest.raises(InvalidPath):
        canonical_path("/a%5cb", ["encoded_slash", "semicolon"])


_path_chars = st.sampled_from([*list("/./..%2e%2E%2f%41%7e~abc;%00\\ é?#%25%5c"), "..", "//"])


@given(st.lists(_path_chars, max_size=30).map(lambda xs: "/" + "".join(xs)))
@settings(max_examples=1500)
def test_canonical_path_properties(raw: str) -> None:
    try:
        p = canonical_path(raw)
    except InvalidPath:
        return
    assert canonical_path(p) == p  # idempotent
    assert p.startswith("/")
    assert "//" not in p
    segments = p.split("/")
    assert ".." not in segments and "." not in segments
    # decoding cannot bring a dot segment or a separator back
    decoded = unquote(p)
    assert ".." not in decoded.split("/") and "\\" not in decoded and "\x00" not in decoded


@given(st.text(max_size=40).map(lambda s: "/" + s))
@settings(max_examples=1000)
def test_canonical_path_any_text(raw: str) -> None:
    try:
        p = canonical_path(raw)
    except InvalidPath:
        return
    assert canonical_path(p) == p
    assert "//" not in p and ".." not in p.split("/")
    assert p.isascii()


# -- whole requests -----------------------------------------------------------

H = [("Host", "api.example.com")]


def ok(*args, **kw) -> CanonicalRequest:
    r = check_request(*args, **kw)
    assert isinstance(r, CanonicalRequest), r
    return r


def rejected(*args, **kw) -> str:
    r = check_request(*args, **kw)
    assert isinstance(r, Rejected), r
    return r.reason


def test_origin_form() -> None:
    r = ok("get", "/a/../b?x=1&y=%41", H)
    assert (r.method, r.host, r.port, r.path, r.query) == ("GET", "api.example.com", 80,
                                                           "/b", "x=1&y=%41")
    assert r.target == "/b?x=1&y=%41"
    v = r.view("sb-1", task_id="T-1")
    assert v.host == "api.example.com" and v.task_id == "T-1" and v.path == "/b"


def test_absolute_form_and_host_agree() -> None:
    r = ok("GET", "http://API.example.com./x", [("Host", "api.example.com:80")])
    assert r.host == "api.example.com" and r.path == "/x"
    r = ok(b"GET", b"https://[::1]:8443/x", [(b"host", b"[::1]:8443")])
    assert (r.scheme, r.host, r.port) == ("https", "::1", 8443)


def test_bytes_from_h11() -> None:
    r = ok(b"POST", b"/x", [(b"host", b"a.test"), (b"content-length", b"5")])
    assert r.body == "length" and r.content_length == 5


@pytest.mark.parametrize(("target", "headers", "why"), [
    ("http://a.test/x", [("Host", "b.test")], "Host header names"),
    ("/x", [("Host", "a.test"), ("Host", "a.test")], "more than one Host"),
    ("/x", [], "Host header is missing"),
    ("/a%2fb", H, "%2F"),
    ("/a\\b", H, "backslash"),
    ("/a;jsessionid=1", H, "';'"),
    ("/x?a=%00", H, "NUL"),
    ("/x?a b", H, "space"),
    ("/x#frag", H, "fragment"),
    ("*", H, "path or an http(s) URL"),
    ("ftp://a.test/", H, "path or an http(s) URL"),
    ("http://u:p@api.example.com/", H, "credentials"),
    ("/x", [*H, ("Content-Length", "3"), ("Transfer-Encoding", "chunked")], "smuggling"),
    ("/x", [*H, ("Content-Length", "3"), ("Content-Length", "4")], "conflicting"),
    ("/x", [*H, ("Content-Length", "3, 4")], "conflicting"),
    ("/x", [*H, ("Content-Length", "-1")], "invalid Content-Length"),
    ("/x", [*H, ("Content-Length", "0x10")], "invalid Content-Length"),
    ("/x", [*H, ("Transfer-Encoding", "chunked, identity")], "Transfer-Encoding"),
    ("/x", [*H, ("Transfer-Encoding", "xchunked")], "Transfer-Encoding"),
    ("/x", [*H, ("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
     "Transfer-Encoding"),
    ("/x", [*H, ("Bad Name", "v")], "invalid header name"),
    ("/x", [*H, ("X-A", "v\x00")], "control character"),
])
def test_ambiguous_requests_are_rejected(target: str, headers: list, why: str) -> None:
    assert why in rejected("GET", target, headers)


def test_trace_and_bad_methods() -> None:
    assert "echoes" in rejected("TRACE", "/", H)
    assert "echoes" in rejected("track", "/", H)
    assert "token" in rejected("G ET", "/", H)
    assert "CONNECT" in rejected("CONNECT", "a.test:443", H)


def test_authority_must_agree_no_domain_fronting() -> None:
    r = ok("GET", "/x", [("Host", "a.test")], scheme="https", authority=("A.test", 443))
    assert (r.host, r.port) == ("a.test", 443)
    assert "domain fronting" in rejected("GET", "/x", [("Host", "b.test")], scheme="https",
                                         authority=("a.test", 443))
    assert "domain fronting" in rejected("GET", "/x", [("Host", "a.test:8443")],
                                         scheme="https", authority=("a.test", 443))
    # HTTP/1.0 without Host inside a tunnel takes the tunnel's authority
    r = ok("GET", "/x", [], scheme="https", authority=("a.test", 443), http_version="1.0")
    assert r.host == "a.test"


def test_relax_callback_per_host() -> None:
    def relax(host: str) -> list[str]:
        return ["encoded_slash"] if host == "registry.npmjs.org" else []

    r = ok("GET", "/@types%2fnode", [("Host", "registry.npmjs.org")], relax=relax)
    assert r.path == "/@types%2Fnode"
    assert "%2F" in rejected("GET", "/@types%2fnode", [("Host", "evil.test")], relax=relax)


def test_body_framing() -> None:
    assert ok("GET", "/", H).body == "none"
    assert ok("POST", "/", [*H, ("Transfer-Encoding", "Chunked")]).body == "chunked"
    r = ok("POST", "/", [*H, ("Content-Length", "7"), ("Content-Length", "7")])
    assert (r.body, r.content_length) == ("length", 7)


_hdr_names = st.sampled_from(["Host", "host", "Content-Length", "Transfer-Encoding", "X-A"])
_hdr_values = st.sampled_from(["a.test", "b.test", "5", "0", "chunked", " chunked",
                               "gzip, chunked", "5,5", "", "a.test:80"])


@given(st.sampled_from(["GET", "POST", "get"]),
       st.sampled_from(["/", "/x/../y", "http://a.test/x", "http://b.test/y", "/%2e/", "//x"]),
       st.lists(st.tuples(_hdr_names, _hdr_values), max_size=5))
@settings(max_examples=600)
def test_check_request_never_raises_and_is_consistent(method, target, headers) -> None:
    r = check_request(method, target, headers)
    if isinstance(r, Rejected):
        assert r.reason
        return
    hosts = [v for k, v in headers if k.lower() == "host"]
    assert len(hosts) == 1
    names = [k.lower() for k, _ in headers]
    assert not ("content-length" in names and "transfer-encoding" in names)
    assert canonical_path(r.path) == r.path
    # the canonical request checks out again, unchanged
    again = check_request(r.method, r.target, [("Host", r.authority)])
    assert isinstance(again, CanonicalRequest)
    assert (again.host, again.port, again.path, again.query) == (r.host, r.port, r.path,
                                                                  r.query)
