"""The policy engine: precedence, matching, git rules, addresses, remembered approvals."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.security.approvals import ApprovalQueue, RememberedApprovals
from corral.security.canon import CanonicalRequest, check_request
from corral.security.engine import Engine, glob_to_regex, special_address
from corral.security.policy import load_policy
from corral.security.types import ZERO_SHA, RefUpdate, RequestView
from corral.store import Store

A, B = "a" * 40, "b" * 40


def engine(tmp_path: Path, text: str, **kw) -> Engine:
    p = tmp_path / "policy.yaml"
    p.write_text(textwrap.dedent(text))
    kw.setdefault("host_addresses", lambda: frozenset({ipaddress.ip_address("203.0.113.9")}))
    return Engine(load_policy(p), **kw)


def req(method: str, url: str, *, updates: tuple[RefUpdate, ...] = (), sandbox: str = "sb-1",
        task: str | None = None) -> RequestView:
    scheme = "https" if url.startswith("https") else "http"
    r = check_request(method, url, [], scheme=scheme, http_version="1.0")
    assert isinstance(r, CanonicalRequest), r
    return r.view(sandbox, task_id=task, git_updates=updates)


ISSUE = """\
network:
  default: deny
  rules:
    - {host: api.github.com, methods: [GET], paths: ["/repos/acme/app/**"], decision: allow}
    - {host: api.github.com, methods: [DELETE], decision: ask, reason: "deleting needs a human"}
    - {host: "*.example.com", decision: deny, reason: "example.com is off limits"}
    - {host: github.com, git: {push: {"refs/heads/main": ask, "refs/heads/*": allow}, delete: deny}}
    - {host: github.com, methods: [GET, POST], paths: ["/acme/app.git/**"], decision: allow}
"""


def test_issue_example(tmp_path: Path) -> None:
    e = engine(tmp_path, ISSUE)
    d = e.decide(req("GET", "https://api.github.com/repos/acme/app/pulls"))
    assert (d.action, d.rule) == ("allow", 0)
    assert e.decide(req("GET", "https://api.github.com/repos/acme/app")).action == "allow"
    d = e.decide(req("GET", "https://api.github.com/repos/acme/other"))
    assert d.action == "deny" and d.rule is None and "default is deny" in d.reason
    d = e.decide(req("DELETE", "https://api.github.com/repos/acme/app"))
    assert (d.action, d.reason, d.rule) == ("ask", "deleting needs a human", 1)
    d = e.decide(req("GET", "https://cdn.example.com/x"))
    assert (d.action, d.reason) == ("deny", "example.com is off limits")
    assert e.decide(req("GET", "https://example.com/x")).rule is None


def test_canonical_path_cannot_escape_a_path_rule(tmp_path: Path) -> None:
    e = engine(tmp_path, ISSUE)
    for url in ("https://api.github.com/repos/acme/app/../../other/x",
                "https://api.github.com/repos/acme/app/%2e%2e/%2e%2e/other",
                "https://api.github.com/repos/acme/app/..//..//other"):
        assert e.decide(req("GET", url)).action == "deny", url


def test_deny_beats_ask_beats_allow_regardless_of_order(tmp_path: Path) -> None:
    e = engine(tmp_path, """\
        network:
          rules:
            - {host: a.test, decision: allow}
            - {host: a.test, paths: ["/admin/**"], decision: ask}
            - {host: "*", methods: [DELETE], decision: deny, reason: no deletes}
            - {host: a.test, paths: ["/admin/**"], decision: allow}
        """)
    assert e.decide(req("GET", "http://a.test/x")).action == "allow"
    d = e.decide(req("GET", "http://a.test/admin/users"))
    assert (d.action, d.rule) == ("ask", 1)
    d = e.decide(req("DELETE", "http://a.test/admin/users"))
    assert (d.action, d.reason) == ("deny", "no deletes")
    assert e.decide(req("GET", "http://b.test/")).action == "deny"


def test_default_ask_and_custom_reason(tmp_path: Path) -> None:
    e = engine(tmp_path, """\
        network: {default: ask, default_reason: "ask Bob"}
        """)
    d = e.decide(req("GET", "http://a.test/"))
    assert (d.action, d.reason, d.rule) == ("ask", "ask Bob", None)


def test_ports_and_methods(tmp_path: Path) -> None:
    e = engine(tmp_path, """\
        network:
          rules:
            - {host: a.test, port: 443, decision: allow}
            - {host: b.test, ports: [80, "8000-8100"], methods: [GET, HEAD], decision: allow}
        """)
    assert e.decide(req("GET", "https://a.test/")).action == "allow"
    assert e.decide(req("GET", "http://a.test/")).action == "deny"
    assert e.decide(req("GET", "http://b.test:8050/")).action == "allow"
    assert e.decide(req("HEAD", "http://b.test/")).action == "allow"
    assert e.decide(req("GET", "http://b.test:8101/")).action == "deny"
    assert e.decide(req("POST", "http://b.test/")).action == "deny"


def test_path_globs() -> None:
    rx = glob_to_regex("/repos/*/app/**")
    assert rx.fullmatch("/repos/acme/app")
    assert rx.fullmatch("/repos/acme/app/")
    assert rx.fullmatch("/repos/acme/app/a/b")
    assert not rx.fullmatch("/repos/acme/x/app/a")
    assert not rx.fullmatch("/repos/acme/apple")
    assert glob_to_regex("/a/*.whl").fullmatch("/a/x.whl")
    assert not glob_to_regex("/a/*.whl").fullmatch("/a/b/x.whl")
    assert glob_to_regex("/**").fullmatch("/")
    assert not glob_to_regex("/a.b").fullmatch("/axb")  # '.' is literal
    ref = glob_to_regex("refs/heads/*", star_crosses_slash=True)
    assert ref.fullmatch("refs/heads/feature/x") and not ref.fullmatch("refs/tags/v1")


# -- git ------------------------------------------------------------------------

PUSH = "https://github.com/acme/app.git/git-receive-pack"


def push(*updates: RefUpdate) -> RequestView:
    return req("POST", PUSH, updates=updates)


def test_git_rules_per_ref(tmp_path: Path) -> None:
    e = engine(tmp_path, ISSUE)
    d = e.decide(push(RefUpdate(A, B, "refs/heads/feature/x")))
    assert d.action == "allow" and d.ref == "refs/heads/feature/x"
    d = e.decide(push(RefUpdate(A, B, "refs/heads/main")))
    assert (d.action, d.ref, d.rule) == ("ask", "refs/heads/main", 3)
    assert "refs/heads/main" in d.reason
    # one held ref holds the whole push; one denied ref denies it
    d = e.decide(push(RefUpdate(A, B, "refs/heads/f"), RefUpdate(A, B, "refs/heads/main")))
    assert (d.action, d.ref) == ("ask", "refs/heads/main")
    d = e.decide(push(RefUpdate(A, B, "refs/heads/main"), RefUpdate(A, ZERO_SHA, "refs/heads/f")))
    assert (d.action, d.ref) == ("deny", "refs/heads/f") and "deleting" in d.reason
    # a ref no git pattern names falls to the default, even though a plain rule allows
    # POSTs to the repository (git rules govern pushes once they exist)
    d = e.decide(push(RefUpdate(A, B, "refs/tags/v1")))
    assert (d.action, d.ref, d.rule) == ("deny", "refs/tags/v1", None)
    # a push whose refs were not read fails closed where git rules govern
    d = e.decide(push())
    assert d.action == "deny" and "not read" in d.reason


def test_git_discovery_and_fetch(tmp_path: Path) -> None:
    e = engine(tmp_path, """\
        network:
          rules:
            - {host: github.com, git: {push: {"refs/heads/*": allow}}}
        """)
    d = e.decide(req("GET", "https://github.com/acme/app.git/info/refs?service=git-receive-pack"))
    assert d.action == "allow"
    # fetching is not a push: git rules do not allow it
    d = e.decide(req("GET", "https://github.com/acme/app.git/info/refs?service=git-upload-pack"))
    assert d.action == "deny"
    assert e.decide(push(RefUpdate(A, B, "refs/heads/x"))).action == "allow"


def test_plain_rules_decide_pushes_without_git_rules(tmp_path: Path) -> None:
    e = engine(tmp_path, """\
        network:
          rules:
            - {host: git.test, decision: allow}
            - {host: git.test, paths: ["/locked/**"], decision: deny}
        """)
    assert e.decide(req("POST", "https://git.test/a.git/git-receive-pack",
                        updates=(RefUpdate(A, B, "refs/heads/x"),))).action == "allow"
    assert e.decide(req("POST", "https://git.test/locked/a.git/git-receive-pack",
                        updates=(RefUpdate(A, B, "refs/heads/x"),))).action == "deny"


def test_plain_deny_and_ask_still_apply_to_pushes(tmp_path: Path) -> None:
    e = engine(tmp_path, """\
        network:
          rules:
            - {host: github.com, git: {push: {"refs/heads/*": allow}}}
            - {host: github.com, methods: [POST], decision: ask, reason: "POSTs need a human"}
        """)
    d = e.decide(push(RefUpdate(A, B, "refs/heads/x")))
    assert (d.action, d.reason) == ("ask", "POSTs need a human")


def test_git_rule_path_scopes_the_repository(tmp_path: Path) -> None:
    e = engine(tmp_path, """\
        network:
          rules:
            - {host: github.com, paths: ["/acme/app.git/**"], git: {push: {"refs/*": allow}}}
        """)
    assert e.decide(push(RefUpdate(A, B, "refs/heads/x"))).action == "allow"
    other = req("POST", "https://github.com/evil/app.git/git-receive-pack",
                updates=(RefUpdate(A, B, "refs/heads/x"),))
    assert e.decide(other).action == "deny"


# -- addresses --------------------------------------------------------------------

ip = ipaddress.ip_address


@pytest.mark.parametrize("addr", [
    "127.0.0.1", "127.5.5.5", "::1", "169.254.169.254", "fe80::1", "10.1.2.3", "172.16.0.1",
    "192.168.1.1", "fd00::1", "100.64.0.1", "0.0.0.0", "::", "224.0.0.1", "ff02::1",
    "255.255.255.255", "240.0.0.1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
    "2002:7f00:1::", "64:ff9b::a9fe:a9fe", "203.0.113.9",
])
def test_special_addresses_are_denied(tmp_path: Path, addr: str) -> None:
    e = engine(tmp_path, "network: {rules: [{host: a.test, decision: allow}]}\n")
    d = e.decide_address("a.test", 443, ip(addr))
    assert d.action == "deny", addr
    assert addr.rsplit("::ffff:", maxsplit=1)[-1] in d.reason or str(ip(addr)) in d.reason


def test_public_address_allowed() -> None:
    assert special_address(ip("93.184.216.34")) is None
    assert special_address(ip("2606:2800:220:1::1")) is None


def test_rule_naming_an_address_allows_it(tmp_path: Path) -> None:
    e = engine(tmp_path, """\
        network:
          rules:
            - {host: registry.internal, addresses: [10.9.0.0/16], decision: allow}
            - {addresses: ["127.0.0.1"], ports: [8080], decision: allow}
            - {host: "*", addresses: ["198.51.100.0/24"], decision: deny, reason: "blocked net"}
        upstreams:
          resolve: {api.example.test: "127.0.0.1:8443"}
        """)
    assert e.decide_address("registry.internal", 443, ip("10.9.1.1")).action == "allow"
    assert e.decide_address("registry.internal", 443, ip("10.8.1.1")).action == "deny"
    assert e.decide_address("other.test", 443, ip("10.9.1.1")).action == "deny"
    assert e.decide_address("any.test", 8080, ip("127.0.0.1")).action == "allow"
    assert e.decide_address("any.test", 8081, ip("127.0.0.1")).action == "deny"
    d = e.decide_address("x.test", 443, ip("198.51.100.7"))
    assert (d.action, d.reason) == ("deny", "blocked net")
    # a direct request to the IP literal matches the address-only rule
    assert e.decide(req("GET", "http://127.0.0.1:8080/")).action == "allow"
    assert e.decide(req("GET", "http://127.0.0.1:8081/")).action == "deny"
    # the deny naming addresses does not deny every host, only those addresses
    assert e.decide(req("GET", "https://registry.internal/")).action == "allow"
    assert e.decide(req("GET", "http://198.51.100.7/")).action == "deny"
    # upstreams.resolve: the mapped address is allowed for that name
    assert e.upstream("api.example.test", 443) == ("127.0.0.1", 8443)
    assert e.decide_address("api.example.test", 443, ip("127.0.0.1")).action == "allow"
    assert e.upstream("other.test", 443) is None


def test_upstream_keys_with_port(tmp_path: Path) -> None:
    e = engine(tmp_path, """\
        upstreams:
          resolve: {"a.test:80": "[::1]:8080", "a.test": "127.0.0.1", "b.test": "127.0.0.2:1"}
        """)
    assert e.upstream("a.test", 80) == ("::1", 8080)
    assert e.upstream("a.test", 443) == ("127.0.0.1", 443)
    assert e.upstream("b.test", 443) == ("127.0.0.2", 1)


def test_path_relaxations(tmp_path: Path) -> None:
    e = engine(tmp_path, """\
        network:
          allow_encoded_slash: [registry.npmjs.org]
          allow_semicolon: ["*.matrix.test"]
        """)
    assert e.path_relaxations("registry.npmjs.org") == {"encoded_slash"}
    assert e.path_relaxations("a.matrix.test") == {"semicolon"}
    assert e.path_relaxations("x.test") == frozenset()


# -- remembered approvals ----------------------------------------------------------


def test_remembered_approval_turns_that_exact_ask_into_allow(tmp_path: Path,
                                                             store: Store) -> None:
    e = engine(tmp_path, ISSUE, remembered=RememberedApprovals(store))
    q = ApprovalQueue(store)
    r = req("DELETE", "https://api.github.com/repos/acme/app/labels/x", task="T-1")
    d = e.decide(r)
    assert d.action == "ask"
    ap = q.hold(r, d, timeout=60)
    q.approve(ap.id, remember=True, actor="user:test")
    d = e.decide(r)
    assert d.action == "allow" and ap.id in d.reason
    # another path, method, port or sandbox is not covered
    assert e.decide(req("DELETE", "https://api.github.com/repos/acme/app/labels/y")
                    ).action == "ask"
    assert e.decide(req("DELETE", "https://api.github.com:8443/repos/acme/app/labels/x")
                    ).action == "ask"
    assert e.decide(req("DELETE", "https://api.github.com/repos/acme/app/labels/x",
                        sandbox="sb-2")).action == "ask"
    # ...unless it shares the task
    assert e.decide(req("DELETE", "https://api.github.com/repos/acme/app/labels/x",
                        sandbox="sb-2", task="T-1")).action == "allow"


def test_remembered_push_ref(tmp_path: Path, store: Store) -> None:
    e = engine(tmp_path, ISSUE, remembered=RememberedApprovals(store))
    q = ApprovalQueue(store)
    r = push(RefUpdate(A, B, "refs/heads/main"), RefUpdate(A, B, "refs/heads/f"))
    d = e.decide(r)
    assert (d.action, d.ref) == ("ask", "refs/heads/main")
    q.approve(q.hold(r, d, timeout=60).id, remember=True)
    assert e.decide(push(RefUpdate(B, A, "refs/heads/main"))).action == "allow"
    assert e.decide(push(RefUpdate(A, B, "refs/heads/main"),
                         RefUpdate(A, ZERO_SHA, "refs/heads/f"))).action == "deny"


def test_remembered_never_overrides_deny(tmp_path: Path, store: Store) -> None:
    from corral.store.security_models import RememberedRow

    with store.session() as s:
        s.add(RememberedRow(sandbox_id="sb-1", method="GET", host="cdn.example.com", port=443,
                            path="/x", ref="", approval_id="ap-x"))
    e = engine(tmp_path, ISSUE, remembered=RememberedApprovals(store))
    assert e.decide(req("GET", "https://cdn.example.com/x")).action == "deny"


# -- property: the engine is total and consistent --------------------------------

_methods = st.sampled_from(["GET", "POST", "DELETE", "PUT"])
_hosts = st.sampled_from(["api.github.com", "github.com", "a.example.com", "x.test"])
_paths = st.sampled_from(["/", "/repos/acme/app", "/repos/acme/app/x", "/acme/app.git/x",
                          "/acme/app.git/git-receive-pack"])
_refs = st.lists(st.tuples(st.sampled_from(["refs/heads/main", "refs/heads/f", "refs/tags/t"]),
                           st.booleans()), max_size=3)


@given(_methods, _hosts, _paths, _refs)
@settings(max_examples=300, deadline=None)
def test_push_decision_is_its_worst_ref(tmp_path_factory, method, host, path, refs) -> None:
    e = _cached_engine(tmp_path_factory)
    updates = tuple(RefUpdate(A, ZERO_SHA if delete else B, ref) for ref, delete in refs)
    whole = e.decide(req(method, f"https://{host}{path}", updates=updates))
    assert whole.action in ("allow", "deny", "ask") and whole.reason
    if updates and method == "POST" and path.endswith("git-receive-pack") \
            and host == "github.com":
        rank = {"allow": 0, "ask": 1, "deny": 2}
        singles = [e.decide(req(method, f"https://{host}{path}", updates=(u,)))
                   for u in updates]
        assert rank[whole.action] == max(rank[s.action] for s in singles)


_engines: dict[str, Engine] = {}


def _cached_engine(factory) -> Engine:
    if "e" not in _engines:
        _engines["e"] = engine(factory.mktemp("pol"), ISSUE)
    return _engines["e"]
