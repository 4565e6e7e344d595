"""``Engine``: the ``PolicyEngine`` of one policy (see ``types.PolicyEngine``).

    engine = Engine(load_policy("policy.yaml"), remembered=RememberedApprovals(store))
    d = engine.decide(view)            # Decision(action, reason, rule, ref)
    engine.decide_address("api.example.com", 443, ipaddress.ip_address("10.0.0.5"))
    engine.upstream("api.example.test", 443)   # ("127.0.0.1", 8443) from upstreams.resolve

Precedence: among the rules that match a request, deny beats ask beats allow;
when none matches, ``network.default`` decides. A push (``git-receive-pack`` with
ref updates) is decided per ref and the push takes its worst ref: one held ref
holds the whole push, one denied ref denies it. An ``ask`` whose exact shape a
human approved with ``--remember`` becomes an allow (a deny stays a deny).
Decisions are pure and fast: no I/O except the remembered-approval lookup,
which happens only for ``ask``.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from corral.security import gitproto
from corral.security.canon import (
    RELAX_ENCODED_SLASH,
    RELAX_SEMICOLON,
    format_authority,
    split_authority,
)
from corral.security.policy import Policy, Rule, host_matches
from corral.security.types import Action, Decision, IPAddress, RefUpdate, RequestView

__all__ = ["Engine", "RememberedLookup", "glob_to_regex", "local_addresses",
           "special_address"]

_RANK: dict[Action, int] = {"allow": 0, "ask": 1, "deny": 2}


class RememberedLookup(Protocol):
    """Remembered approvals (``approve --remember``), e.g. ``approvals.RememberedApprovals``."""

    def find(self, req: RequestView, ref: str | None) -> str | None:
        """The id of the approval that allowed this exact shape (and ref), if any."""
        ...


def glob_to_regex(pattern: str, *, star_crosses_slash: bool = False) -> re.Pattern[str]:
    """Compile a path glob: ``**`` matches anything, ``*`` anything but '/'.

    A trailing ``/**`` also matches the directory itself (``/a/**`` matches ``/a``).
    With ``star_crosses_slash`` (git refs) ``*`` matches '/' too."""
    tail = ""
    if pattern.endswith("/**"):
        pattern, tail = pattern[:-3], "(?:/.*)?"
    star = ".*" if star_crosses_slash else "[^/]*"
    parts = re.split(r"(\*\*|\*)", pattern)
    body = "".join(".*" if p == "**" else star if p == "*" else re.escape(p) for p in parts)
    return re.compile(body + tail, re.DOTALL)


@dataclass(frozen=True)
class _Compiled:
    index: int
    rule: Rule
    ports: tuple[tuple[int, int], ...] | None
    methods: frozenset[str] | None
    paths: tuple[re.Pattern[str], ...] | None
    nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    push: tuple[tuple[re.Pattern[str], Action], ...]

    @classmethod
    def of(cls, index: int, rule: Rule) -> _Compiled:
        pr = rule.port_ranges()
        git = rule.git
        return cls(
            index=index, rule=rule,
            ports=tuple(pr) if pr is not None else None,
            methods=frozenset(rule.methods) if rule.methods is not None else None,
            paths=tuple(glob_to_regex(p) for p in rule.paths) if rule.paths else None,
            nets=tuple(ipaddress.ip_network(a, strict=False) for a in rule.addresses or ()),
            push=tuple((glob_to_regex(p, star_crosses_slash=True), a)
                       for p, a in (git.push.items() if git else ())),
        )

    def port_ok(self, port: int) -> bool:
        return self.ports is None or any(lo <= port <= hi for lo, hi in self.ports)

    def host_ok(self, host: str) -> bool:
        if self.nets:
            try:
                addr = ipaddress.ip_address(host)
            except ValueError:
                addr = None
            if addr is not None:
                # a request to an IP literal: the rule must name that address
                return (any(addr in n for n in self.nets)
                        and (self.rule.host is None or host_matches(self.rule.host, host)))
            if self.rule.host is None or self.rule.decision == "deny":
                # a deny naming addresses denies those addresses (decide_address), not
                # every request to the host
                return False
        return self.rule.host is not None and host_matches(self.rule.host, host)

    def target_ok(self, req: RequestView) -> bool:
        """Host, port and path (what a git rule matches)."""
        return (self.host_ok(req.host) and self.port_ok(req.port)
                and (self.paths is None or any(p.fullmatch(req.path) for p in self.paths)))

    def matches(self, req: RequestView) -> bool:
        return self.target_ok(req) and (self.methods is None or req.method in self.methods)

    def ref_action(self, update: RefUpdate) -> Action | None:
        """This git rule's decision for one ref update (None: it does not say)."""
        git = self.rule.git
        assert git is not None
        if update.is_delete and git.delete is not None:
            return git.delete
        best: Action | None = None
        for rx, action in self.push:
            if rx.fullmatch(update.ref) and (best is None or _RANK[action] > _RANK[best]):
                best = action
        return best


@dataclass(frozen=True)
class _Candidate:
    action: Action
    index: int | None
    ref: str | None = None


def _strongest(cands: Iterable[_Candidate]) -> _Candidate | None:
    best: _Candidate | None = None
    for c in cands:
        if best is None or _RANK[c.action] > _RANK[best.action]:
            best = c
    return best


class Engine:
    """Decides requests and addresses for one policy. Thread safe (immutable)."""

    def __init__(self, policy: Policy, *, remembered: RememberedLookup | None = None,
                 host_addresses: Callable[[], frozenset[IPAddress]] | None = None) -> None:
        self.policy = policy
        self._remembered = remembered
        self._host_addresses = host_addresses or local_addresses
        self._rules = tuple(_Compiled.of(i, r) for i, r in enumerate(policy.network.rules))
        self._plain = tuple(c for c in self._rules if c.rule.git is None)
        self._git = tuple(c for c in self._rules if c.rule.git is not None)
        self._named = tuple(c for c in self._rules if c.nets)
        self._upstreams = {k: _parse_target(v) for k, v in policy.upstreams.resolve.items()}

    # -- requests --------------------------------------------------------------

    def decide(self, req: RequestView) -> Decision:
        """Deny beats ask beats allow; otherwise the policy's default."""
        plain = [_Candidate(c.rule.decision or "allow", c.index)
                 for c in self._plain if c.matches(req)]
        git = [c for c in self._git if c.target_ok(req)]
        if git and gitproto.is_receive_pack_request(req.method, req.path):
            if not req.git_updates:
                # fail closed: git rules govern this repository but no ref was read
                return Decision("deny", f"{_describe(req)}: a push whose ref updates were "
                                "not read cannot be checked against the git rules.",
                                git[0].index)
            return self._decide_push(req, git, plain)
        if git and gitproto.is_receive_pack_discovery(req.method, req.path, req.query):
            # the ref advertisement that starts a push: the refs are decided on the POST
            plain.append(_Candidate("allow", git[0].index))
        best = _strongest(plain)
        if best is None:
            return self._default(req)
        if best.action == "ask":
            approved = self._remembered_id(req, None)
            if approved:
                return Decision("allow", f"approved earlier by a human ({approved})",
                                best.index)
        return Decision(best.action, self._reason(best, req), best.index)

    def _decide_push(self, req: RequestView, git: Sequence[_Compiled],
                     plain: Sequence[_Candidate]) -> Decision:
        # a host-wide allow does not allow refs once git rules govern the repository;
        # its deny or ask still applies to every ref
        blocking = [c for c in plain if c.action != "allow"]
        worst: Decision | None = None
        for update in req.git_updates:
            cands = [_Candidate(a, c.index, update.ref) for c in git
                     if (a := c.ref_action(update)) is not None]
            best = _strongest([*cands, *(_Candidate(b.action, b.index, update.ref)
                                         for b in blocking)])
            if best is None:
                d = self._default(req, ref=update.ref)
            elif best.action == "ask" and (approved := self._remembered_id(req, update.ref)):
                d = Decision("allow", f"approved earlier by a human ({approved})",
                             best.index, update.ref)
            else:
                d = Decision(best.action, self._reason(best, req, update), best.index,
                             update.ref)
            if worst is None or _RANK[d.action] > _RANK[worst.action]:
                worst = d
        assert worst is not None
        return worst

    def _remembered_id(self, req: RequestView, ref: str | None) -> str | None:
        if self._remembered is None:
            return None
        return self._remembered.find(req, ref)

    def _default(self, req: RequestView, ref: str | None = None) -> Decision:
        net = self.policy.network
        what = _describe(req, ref)
        if net.default_reason:
            reason = net.default_reason
        elif net.default == "ask":
            reason = f"{what} matches no rule of the corral policy; a human must approve it."
        else:
            reason = (f"{what} is not allowed: no rule of the corral policy allows it and "
                      "the default is deny. If the task needs it, ask the human to add a "
                      "rule to the sandbox's policy.")
        return Decision(net.default, reason, None, ref)

    def _reason(self, cand: _Candidate, req: RequestView,
                update: RefUpdate | None = None) -> str:
        rule = self.policy.network.rules[cand.index] if cand.index is not None else None
        if rule is not None and rule.reason:
            return rule.reason
        what = _describe(req, update.ref if update else None, update)
        where = f"network.rules[{cand.index}]"
        if cand.action == "deny":
            return f"{what} is denied by the corral policy ({where})."
        if cand.action == "ask":
            return f"{what} needs a human's approval ({where})."
        return f"{what} is allowed ({where})."

    # -- addresses -------------------------------------------------------------

    def decide_address(self, host: str, port: int, addr: IPAddress) -> Decision:
        """Whether ``host`` may connect to the address it resolved to.

        Loopback, link-local (cloud metadata), private (RFC 1918, ULA, CGNAT),
        unspecified, multicast, reserved and this host's own addresses are
        denied unless a rule names the address (``addresses``) for this host and
        port, or ``upstreams.resolve`` maps the host there."""
        named = [_Candidate(c.rule.decision or "allow", c.index) for c in self._named
                 if (c.rule.host is None or host_matches(c.rule.host, host))
                 and c.port_ok(port) and any(addr in n for n in c.nets)]
        best = _strongest(named)
        if best is not None:
            if best.action == "deny":
                return Decision("deny", self.policy.network.rules[best.index or 0].reason or
                                f"{host} resolves to {addr}, an address the corral policy "
                                f"denies (network.rules[{best.index}]).", best.index)
            return Decision("allow", f"{addr} is named by network.rules[{best.index}]",
                            best.index)
        up = self.upstream(host, port)
        if up is not None and ipaddress.ip_address(up[0]) == addr:
            return Decision("allow", f"{host} is mapped to {addr} by upstreams.resolve")
        kind = special_address(addr)
        if kind is None and addr in self._host_addresses():
            kind = "one of this machine's own addresses"
        if kind is not None:
            return Decision("deny", f"{host} resolves to {addr}, {kind}; corral does not "
                            "connect there unless a rule names the address (addresses: "
                            f"[\"{addr}\"]).")
        return Decision("allow", f"{addr} is a public address")

    def upstream(self, host: str, port: int) -> tuple[str, int] | None:
        """The ``upstreams.resolve`` override for ``host:port``, if any."""
        hit = self._upstreams.get(f"{host}:{port}") or self._upstreams.get(host)
        if hit is None:
            return None
        addr, p = hit
        return addr, p if p is not None else port

    # -- what the proxy needs besides decisions ---------------------------------

    def path_relaxations(self, host: str) -> frozenset[str]:
        """Path relaxations for ``canon.check_request(relax=...)``."""
        net = self.policy.network
        out = set()
        if any(host_matches(p, host) for p in net.allow_encoded_slash):
            out.add(RELAX_ENCODED_SLASH)
        if any(host_matches(p, host) for p in net.allow_semicolon):
            out.add(RELAX_SEMICOLON)
        return frozenset(out)

    @property
    def extra_ca(self) -> Path | None:
        """A PEM bundle of extra CAs for upstream TLS (``upstreams.extra_ca``)."""
        ca = self.policy.upstreams.extra_ca
        return Path(ca) if ca else None

    @property
    def approval_timeout(self) -> float:
        """Seconds an ``ask`` holds a request before it is denied."""
        return self.policy.approvals.timeout


def _describe(req: RequestView, ref: str | None = None,
              update: RefUpdate | None = None) -> str:
    if ref is not None:
        verb = "deleting" if update is not None and update.is_delete else "pushing to"
        return f"git push ({verb} {ref}) to {req.host}"
    return (f"{req.method} {req.scheme}://{format_authority(req.host, req.port, req.scheme)}"
            f"{req.path}")


def _parse_target(value: str) -> tuple[str, int | None]:
    host, port = split_authority(value)
    return str(ipaddress.ip_address(host.strip("[]"))), port


# -- special addresses ------------------------------------------------------------

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def special_address(addr: IPAddress) -> str | None:
    """Why an address is off limits by default (None for an ordinary public address).

    IPv6 forms that carry an IPv4 address (mapped, 6to4, NAT64, Teredo) are judged
    by the IPv4 address they carry."""
    if isinstance(addr, ipaddress.IPv6Address):
        inner = addr.ipv4_mapped or addr.sixtofour
        if inner is None and addr in _NAT64:
            inner = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if inner is None and addr.teredo:
            inner = addr.teredo[1]
        if inner is not None:
            return special_address(inner)
    if addr.is_loopback:
        return "a loopback address"
    if addr.is_link_local:
        return "a link-local address (cloud metadata lives there)"
    if addr.is_unspecified:
        return "the unspecified address"
    if addr.is_multicast:
        return "a multicast address"
    if isinstance(addr, ipaddress.IPv4Address) and addr in _CGNAT:
        return "a shared (CGNAT) address"
    if addr.is_private:
        return "a private address"
    if addr.is_reserved or not addr.is_global:
        return "a reserved address"
    return None


_local_cache: list[tuple[float, frozenset[IPAddress]]] = [(0.0, frozenset())]


def local_addresses(max_age: float = 30.0) -> frozenset[IPAddress]:
    """This machine's own addresses (root network namespace), cached ``max_age`` s."""
    at, cached = _local_cache[0]
    now = time.monotonic()
    if at and now - at < max_age:
        return cached
    found: set[IPAddress] = set()
    try:
        text = Path("/proc/net/fib_trie").read_text()
        last = None
        for line in text.splitlines():
            s = line.strip()
            if s.startswith("|--"):
                last = s[3:].strip()
            elif s.startswith("/32 host LOCAL") and last:
                found.add(ipaddress.IPv4Address(last))
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            hexaddr = line.split()[0]
            found.add(ipaddress.IPv6Address(int(hexaddr, 16)))
    except (OSError, ValueError, IndexError):
        pass
    _local_cache[0] = (now, frozenset(found))
    return _local_cache[0][1]
