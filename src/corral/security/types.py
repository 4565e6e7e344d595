"""Shared types of the security layer: what the proxy asks, what the policy,
the secret broker, the meter, the approval queue and the audit log answer.

This module is the contract between the proxy (``corral.security.proxy``) and the
policy side (``policy``, ``engine``, ``secrets``, ``metering``, ``approvals``,
``audit``). Both sides import from here; neither imports the other's internals.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Action = Literal["allow", "deny", "ask"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ZERO_SHA = "0" * 40


@dataclass(frozen=True)
class RefUpdate:
    """One ref-update command of a ``git push`` (from the receive-pack request)."""

    old: str
    new: str
    ref: str

    @property
    def is_delete(self) -> bool:
        # all zeros: 40 of them for SHA-1 repositories, 64 for SHA-256 ones
        return not self.new.strip("0")

    @property
    def is_create(self) -> bool:
        return not self.old.strip("0")


@dataclass(frozen=True)
class RequestView:
    """One HTTP request as the policy sees it: already canonical and unambiguous.

    The proxy builds it only after rejecting ambiguous requests, and forwards
    upstream exactly the request this view describes.
    """

    sandbox_id: str
    scheme: Literal["http", "https"]
    #: canonical host: lowercase, IDNA (punycode), no trailing dot; or an IP literal
    host: str
    port: int
    #: uppercase method
    method: str
    #: canonical path: dot segments resolved, // collapsed, unreserved %XX decoded
    path: str
    #: raw query string without "?" ("" when none)
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    #: for git-receive-pack pushes: the ref updates parsed from the body
    git_updates: tuple[RefUpdate, ...] = ()
    task_id: str | None = None

    def header(self, name: str) -> str | None:
        low = name.lower()
        for k, v in self.headers:
            if k.lower() == low:
                return v
        return None


@dataclass(frozen=True)
class Decision:
    """The policy's answer for one request (or one resolved address)."""

    action: Action
    #: written for the agent to read: the body of a 403, the prompt of an approval
    reason: str
    #: index of the deciding rule in ``network.rules``; None for the default
    rule: int | None = None
    #: the git ref that decided, for git rules
    ref: str | None = None

    @property
    def allowed(self) -> bool:
        return self.action == "allow"


class PolicyEngine(Protocol):
    """Decides requests against one sandbox's policy (reloaded in place)."""

    def decide(self, req: RequestView) -> Decision:
        """Deny beats ask beats allow; otherwise the policy's default."""
        ...

    def decide_address(self, host: str, port: int, addr: IPAddress) -> Decision:
        """Whether an allowed name may connect to the address it resolved to
        (loopback, link-local, private ranges and the host itself are denied
        unless a rule names that address)."""
        ...

    def upstream(self, host: str, port: int) -> tuple[str, int] | None:
        """The ``upstreams.resolve`` override for ``host:port``, if any."""
        ...


@dataclass(frozen=True)
class Rewrite:
    """What the secret broker did to an outgoing request."""

    headers: tuple[tuple[str, str], ...]
    target: str
    #: names of secrets whose sentinel was swapped for the real value
    injected: tuple[str, ...] = ()
    #: a secret whose sentinel was headed to a host it is not bound to
    blocked: str | None = None


class Scrubber(Protocol):
    """Streams a response body, replacing real secret values by their sentinels."""

    def feed(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class SecretBroker(Protocol):
    """Per-sandbox secrets: sentinels inside, real values only in the proxy."""

    def sentinels(self) -> Mapping[str, str]:
        """Secret name -> the sentinel the sandbox sees (its environment)."""
        ...

    def rewrite(self, host: str, headers: Sequence[tuple[str, str]], target: str) -> Rewrite:
        """Swap sentinels in headers (Basic credentials included) and the query of
        ``target`` for real values if ``host`` is bound to the secret; report a
        sentinel headed anywhere else in ``Rewrite.blocked``."""
        ...

    def scrubber(self) -> Scrubber:
        """A fresh scrubber for one response."""
        ...


@dataclass(frozen=True)
class Usage:
    """Token usage of one model API response."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    model: str | None = None
    provider: str | None = None  # anthropic | openai

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens + self.cache_write_tokens


class UsageParser(Protocol):
    """Reads usage out of one response body as it streams (JSON or SSE)."""

    def feed(self, data: bytes) -> None: ...

    def usage(self) -> Usage | None: ...


@dataclass
class Approval:
    """A live request held for a human."""

    id: str
    sandbox_id: str
    task_id: str | None
    summary: str  # "POST https://api.github.com/repos/x/y (git push refs/heads/main)"
    reason: str
    status: Literal["pending", "approved", "denied", "timeout"] = "pending"
    request: dict[str, Any] = field(default_factory=dict)
    #: who decided ("user:alice", "corral" for a timeout), once decided
    actor: str | None = None
    #: the human's reason for a denial (tell it to the agent)
    decision_reason: str | None = None


@dataclass(frozen=True)
class AuditRecord:
    """One line of the audit log."""

    seq: int
    time: str
    event: str
    sandbox: str | None
    task: str | None
    actor: str
    details: dict[str, Any]
    prev_hash: str
    hash: str
