"""Secrets by sentinel: sources, sentinels, request rewriting, response scrubbing."""

from __future__ import annotations

import base64
import logging
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.security.policy import parse_policy
from corral.security.secrets import (
    SENTINEL_PREFIX,
    Broker,
    SecretError,
    resolve_source,
    sentinel_key,
)

REAL = "ghp_" + "R3alT0kenValue" * 3  # 46 characters
KEY = "sk-ant-" + "k" * 40


def broker(**kw) -> Broker:
    return Broker("sb-1", {"GITHUB_TOKEN": (REAL, ["api.github.com", "github.com"]),
                           "ANTHROPIC_API_KEY": (KEY, ["*.anthropic.com"])}, **kw)


# -- sources --------------------------------------------------------------------


def test_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_TEST_SECRET", "from-env\n")
    assert resolve_source("A", "env:CORRAL_TEST_SECRET") == "from-env"
    f = tmp_path / "key.txt"
    f.write_text("from-file\n\n")
    assert resolve_source("A", f"file:{f}") == "from-file"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_source("A", "file:~/key.txt") == "from-file"
    cmd = f"{sys.executable} -c \"print('from-command')\""
    assert resolve_source("A", f"command:{cmd}") == "from-command"


@pytest.mark.parametrize(("source", "why"), [
    ("env:CORRAL_SURELY_UNSET_VAR", "is not set"),
    ("file:/nonexistent/corral/key", "cannot read"),
    ("command:false", "failed with exit 1"),
    ("command:/nonexistent/tool", "cannot run"),
    ("vault:x", "unknown source"),
])
def test_source_errors_are_one_line_without_value(source: str, why: str) -> None:
    with pytest.raises(SecretError, match=why) as ei:
        resolve_source("TOKEN", source)
    assert "\n" not in str(ei.value) and str(ei.value).startswith("secret TOKEN: ")


def test_bad_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_TEST_SECRET", "")
    with pytest.raises(SecretError, match="empty"):
        resolve_source("A", "env:CORRAL_TEST_SECRET")
    monkeypatch.setenv("CORRAL_TEST_SECRET", "a\nb")
    with pytest.raises(SecretError, match="control character") as ei:
        resolve_source("A", "env:CORRAL_TEST_SECRET")
    assert "a\nb" not in str(ei.value)


def test_command_runs_once(tmp_path: Path) -> None:
    counter = tmp_path / "n"
    script = tmp_path / "tok.sh"
    script.write_text(f"#!/bin/sh\necho x >> {counter}\necho tok-{'z' * 30}\n")
    script.chmod(0o755)
    pol = parse_policy({"secrets": {"T": {"source": f"command:{script}", "hosts": ["a.test"]}}})
    b = Broker.from_policy(pol, "sb-1")
    b.rewrite("a.test", [("Authorization", f"Bearer {b.sentinels()['T']}")], "/")
    b.rewrite("a.test", [("Authorization", f"Bearer {b.sentinels()['T']}")], "/")
    assert counter.read_text().count("x") == 1


# -- sentinels ------------------------------------------------------------------


def test_sentinels_unique_recognizable_same_length() -> None:
    b1, b2 = broker(), broker()
    s1, s2 = b1.sentinels(), b2.sentinels()
    assert s1["GITHUB_TOKEN"] != s2["GITHUB_TOKEN"]
    for name, real in (("GITHUB_TOKEN", REAL), ("ANTHROPIC_API_KEY", KEY)):
        assert s1[name].startswith(SENTINEL_PREFIX)
        assert len(s1[name]) == len(real)
        assert real not in s1[name]
    short = Broker("sb", {"P": ("hunter2", ["a.test"])}).sentinels()["P"]
    assert len(short) == 24


def test_keyed_sentinels_are_stable_per_sandbox(tmp_path: Path) -> None:
    key = sentinel_key(tmp_path)
    assert sentinel_key(tmp_path) == key
    assert (tmp_path / "secrets" / "sentinel.key").stat().st_mode & 0o777 == 0o600
    a = Broker("sb-1", {"T": (REAL, ["a.test"])}, key=key).sentinels()["T"]
    assert a == Broker("sb-1", {"T": (REAL, ["a.test"])}, key=key).sentinels()["T"]
    assert a != Broker("sb-2", {"T": (REAL, ["a.test"])}, key=key).sentinels()["T"]
    assert a != Broker("sb-1", {"U": (REAL, ["a.test"])}, key=key).sentinels()["U"]



def test_first_use_of_the_sentinel_key_is_safe_under_concurrency(tmp_path: Path) -> None:
    """Threads making the key at once all get the same whole key. (A reader used to
    see the empty file another creator had not written yet: its sandbox got
    sentinels the proxy did not recognize. This loop caught that in most rounds.)"""
    import threading

    for attempt in range(50):
        home = tmp_path / f"home-{attempt}"
        go = threading.Barrier(8)
        keys: list[bytes] = []

        def one(home: Path = home, go: threading.Barrier = go, keys: list = keys) -> None:
            go.wait()
            keys.append(sentinel_key(home))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(keys) == 8 and len(set(keys)) == 1, attempt
        assert len(keys[0]) == 32
        assert [f.name for f in (home / "secrets").iterdir()] == ["sentinel.key"]


def test_a_damaged_sentinel_key_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "sentinel.key").write_bytes(b"")
    with pytest.raises(SecretError, match=r"sentinel key .* is damaged"):
        sentinel_key(tmp_path)


def test_repr_never_shows_values() -> None:
    b = broker()
    assert REAL not in repr(b) and REAL not in repr(b._secrets)


# -- rewrite --------------------------------------------------------------------


def test_rewrite_headers_on_bound_host() -> None:
    b = broker()
    s = b.sentinels()["GITHUB_TOKEN"]
    rw = b.rewrite("api.github.com", [("Authorization", f"token {s}"), ("X-Other", "keep")],
                   "/user")
    assert rw.blocked is None and rw.injected == ("GITHUB_TOKEN",)
    assert dict(rw.headers) == {"Authorization": f"token {REAL}", "X-Other": "keep"}
    assert rw.target == "/user"


def test_rewrite_inside_basic_credentials() -> None:
    b = broker()
    s = b.sentinels()["GITHUB_TOKEN"]
    basic = base64.b64encode(f"x-access-token:{s}".encode()).decode()
    rw = b.rewrite("github.com", [("Authorization", f"Basic {basic}")], "/a.git/info/refs")
    (value,) = [v for k, v in rw.headers if k == "Authorization"]
    scheme, enc = value.split()
    assert scheme == "Basic"
    assert base64.b64decode(enc).decode() == f"x-access-token:{REAL}"
    assert rw.injected == ("GITHUB_TOKEN",)


def test_rewrite_query_percent_encodes_the_value() -> None:
    b = Broker("sb", {"K": ("a+b&c=d/" + "x" * 20, ["a.test"])})
    s = b.sentinels()["K"]
    rw = b.rewrite("a.test", [], f"/p?key={s}&x=1")
    assert rw.target == f"/p?key={quote('a+b&c=d/' + 'x' * 20, safe='')}&x=1"


def test_sentinel_in_path_is_not_swapped_but_blocked_elsewhere() -> None:
    b = broker()
    s = b.sentinels()["GITHUB_TOKEN"]
    rw = b.rewrite("api.github.com", [], f"/bot{s}/x")
    assert rw.target == f"/bot{s}/x" and rw.blocked is None
    assert b.rewrite("evil.test", [], f"/bot{s}/x").blocked == "GITHUB_TOKEN"


@pytest.mark.parametrize("where", ["header", "basic", "query", "proxy-auth"])
def test_sentinel_to_another_host_is_blocked(where: str) -> None:
    b = broker()
    s = b.sentinels()["GITHUB_TOKEN"]
    headers, target = [("Host", "evil.test")], "/"
    if where == "header":
        headers.append(("X-Api-Key", f"pre{s}post"))
    elif where == "basic":
        headers.append(("Authorization",
                        "basic " + base64.b64encode(f"u:{s}".encode()).decode()))
    elif where == "proxy-auth":
        headers.append(("Proxy-Authorization", f"Bearer {s}"))
    else:
        target = f"/x?token={s}"
    for host in ("evil.test", "api.github.com.evil.test", "github.co"):
        rw = b.rewrite(host, headers, target)
        assert rw.blocked == "GITHUB_TOKEN"
        assert rw.injected == ()
        assert REAL not in str(rw.headers) and REAL not in rw.target


def test_one_blocked_secret_blocks_the_whole_request() -> None:
    b = broker()
    s = b.sentinels()
    rw = b.rewrite("api.github.com", [("Authorization", f"Bearer {s['GITHUB_TOKEN']}"),
                                      ("X-Key", s["ANTHROPIC_API_KEY"])], "/")
    assert rw.blocked == "ANTHROPIC_API_KEY" and REAL not in str(rw.headers)


def test_glob_hosts_and_no_sentinel() -> None:
    b = broker()
    s = b.sentinels()["ANTHROPIC_API_KEY"]
    assert b.rewrite("api.anthropic.com", [("x-api-key", s)], "/v1/messages").headers == (
        ("x-api-key", KEY),)
    assert b.rewrite("anthropic.com", [("x-api-key", s)], "/").blocked == "ANTHROPIC_API_KEY"
    plain = b.rewrite("anywhere.test", [("A", "b")], "/x?y=1")
    assert plain.blocked is None and plain.injected == () and plain.headers == (("A", "b"),)
    empty = Broker("sb", {})
    assert empty.rewrite("a.test", [("A", "b")], "/").headers == (("A", "b"),)


# -- scrubbing ------------------------------------------------------------------


def test_scrub_raw_url_and_base64_forms() -> None:
    b = Broker("sb", {"K": ("s3cr3t/value+with=chars" + "q" * 10, ["a.test"])})
    real = "s3cr3t/value+with=chars" + "q" * 10
    s = b.sentinels()["K"]
    text = (f"echo {real}; url {quote(real, safe='')}; b64 "
            f"{base64.b64encode(('user:' + real).encode()).decode()}; "
            f"b64b {base64.b64encode(('xy' + real + 'z').encode()).decode()}")
    out = b.scrub_text(text)
    assert real not in out and quote(real, safe="") not in out
    assert s in out
    for chunk in out.split():
        try:
            decoded = base64.b64decode(chunk + "==", validate=False)
        except ValueError:
            continue
        assert real.encode() not in decoded


def test_scrubber_length_preserved_for_long_secrets() -> None:
    b = broker()
    body = f'{{"token": "{REAL}", "again": "{REAL}"}}'.encode()
    sc = b.scrubber()
    out = sc.feed(body) + sc.flush()
    assert len(out) == len(body) and REAL.encode() not in out
    assert out.count(b.sentinels()["GITHUB_TOKEN"].encode()) == 2


@given(st.lists(st.sampled_from(["x", "ghp_", REAL, REAL[:10], REAL[10:], KEY, "\n", "yy" * 5]),
                max_size=12),
       st.lists(st.integers(min_value=0, max_value=60), max_size=12))
@settings(max_examples=400)
def test_scrubber_across_any_chunking(parts: list[str], cuts: list[int]) -> None:
    b = broker()
    body = "".join(parts).encode()
    expect = b.scrub_text(body.decode()).encode()
    sc = b.scrubber()
    out, pos = b"", 0
    for c in cuts:
        out += sc.feed(body[pos:pos + c])
        pos += c
    out += sc.feed(body[pos:]) + sc.flush()
    assert out == expect
    assert REAL.encode() not in out and KEY.encode() not in out


def test_real_value_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    b = broker()
    s = b.sentinels()["GITHUB_TOKEN"]
    b.rewrite("api.github.com", [("Authorization", f"Bearer {s}")], "/")
    b.rewrite("evil.test", [("Authorization", f"Bearer {s}")], "/")
    b.scrubber().feed(REAL.encode())
    assert REAL not in caplog.text
