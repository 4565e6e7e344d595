"""One fenced sandbox as the proxy daemon sees it: its record on disk, its live
policy, its secrets, its CA, its synthetic names and its listening sockets.

An attachment is made once per sandbox and kept: attaching the same sandbox
again (a restarted daemon's re-attach racing with the ``Fence`` that creates
it, or a client retrying) only hands it the secret values it was given
(``give_secrets``); its listeners are never re-bound while they serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from corral.security.approvals import RememberedApprovals
from corral.security.ca import CertificateAuthority
from corral.security.dns import DnsStub, SyntheticNames
from corral.security.engine import Engine
from corral.security.netns import NetnsId, socket_netns
from corral.security.policy import Policy, host_matches
from corral.security.reload import LivePolicy
from corral.security.secrets import Broker, SecretError, resolve_source, sentinel_key

__all__ = ["RECORD", "Attachment", "FenceRecord", "SecretValues", "name_reachable"]

log = logging.getLogger("corral.security.proxy")

RECORD = "fence.json"
#: name -> (real value, host patterns): what the Fence hands the daemon over its socket
SecretValues = Mapping[str, tuple[str, Sequence[str]]]


@dataclass
class FenceRecord:
    """What the daemon needs to (re-)attach a sandbox, kept in ``fence/<id>/fence.json``."""

    sandbox_id: str
    #: the policy file the proxy follows (edits apply within a second)
    policy: str
    netns: str
    #: what the sandbox's sentinels are derived from (fixed before its id exists)
    token: str
    task_id: str | None = None
    transparent: bool = True
    created: float = field(default_factory=time.time)

    def save(self, directory: Path) -> None:
        """Write the record whole (a reader sees the old one or the new one, never half)."""
        tmp = directory / f".{RECORD}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, directory / RECORD)

    def same_sandbox(self, other: FenceRecord) -> bool:
        """Whether ``other`` describes the same fence of the same sandbox (all but the
        time it was written)."""
        mine, theirs = asdict(self), asdict(other)
        mine.pop("created"), theirs.pop("created")
        return mine == theirs

    @classmethod
    def load(cls, directory: Path) -> FenceRecord:
        data = json.loads((directory / RECORD).read_text())
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def name_reachable(engine: Engine, name: str) -> bool:
    """Whether a policy could let the sandbox connect to ``name`` (so DNS answers it)."""
    policy: Policy = engine.policy
    if policy.network.default == "ask":
        return True
    if engine.upstream(name, 443) is not None or engine.upstream(name, 80) is not None:
        return True
    for rule in policy.network.rules:
        if rule.host is None or not host_matches(rule.host, name):
            continue
        if rule.git is not None or rule.decision != "deny":
            return True
    return False


class Attachment:
    """A fenced sandbox attached to the daemon."""

    def __init__(self, record: FenceRecord, directory: Path, home: Path, *,
                 audit: Any, store: Any, secrets: SecretValues | None = None,
                 sink: Any = None, netns_id: NetnsId | None = None) -> None:
        self.record = record
        self.sandbox_id = record.sandbox_id
        self.task_id = record.task_id
        self.directory = directory
        #: the namespace the listeners were made in (checked when attaching again)
        self.netns_id = netns_id
        self._home = home
        self._audit_log = audit
        # where secret values must be scrubbed from: the log, and the daemon's audit sink
        self._redacted = [x for x in (audit, sink) if x is not None]
        self.policy = LivePolicy(record.policy, audit=audit, sandbox=record.sandbox_id,
                                 remembered=RememberedApprovals(store))
        self.ca = CertificateAuthority.load(directory)
        self.names = SyntheticNames(directory / "names.json")
        self.dns = DnsStub(self.names, self.reachable)
        self.closers: list[Any] = []
        #: the listening sockets, by role (for checks and status; the loop owns them)
        self.sockets: dict[str, socket.socket] = {}
        self.errors: list[str] = []
        self._values: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.broker: Broker | None = None
        # the broker is rebuilt from the event loop (policy edits) and from worker
        # threads (secrets handed over by a later attach): one at a time
        self._broker_lock = threading.Lock()
        self._build_broker(self.policy.policy, dict(secrets or {}))
        self.policy.on_change(lambda p: self._build_broker(p, {}))

    def __repr__(self) -> str:
        return f"<Attachment {self.sandbox_id}>"

    @property
    def engine(self) -> Engine:
        """The current engine (a policy edit shows here within a second)."""
        return self.policy.engine

    def reachable(self, name: str) -> bool:
        return name_reachable(self.engine, name)

    def serves(self, record: FenceRecord, netns_id: NetnsId) -> bool:
        """Whether this attachment already serves ``record`` in namespace ``netns_id``,
        with every listener open (then attaching again changes nothing but secrets)."""
        return (self.record.same_sandbox(record) and self.netns_id == netns_id
                and bool(self.sockets)
                and all(s.fileno() >= 0 for s in self.sockets.values())
                and all(not _closing(c) for c in self.closers))

    def listener_namespaces(self) -> dict[str, str]:
        """Role -> the namespace each listening socket lives in (the kernel's answer)."""
        out = {}
        for role, s in self.sockets.items():
            try:
                out[role] = str(socket_netns(s))
            except (OSError, ValueError) as exc:
                out[role] = f"unknown ({exc})"
        return out

    # -- secrets -----------------------------------------------------------------
    def give_secrets(self, given: SecretValues) -> None:
        """Use these real values (from the ``Fence`` that created the sandbox) from now
        on; they win over values this daemon read from the sources itself."""
        if given:
            self._build_broker(self.policy.policy, given)

    def _build_broker(self, policy: Policy, given: SecretValues) -> None:
        with self._broker_lock:
            values: dict[str, tuple[str, tuple[str, ...]]] = {}
            errors: list[str] = []
            for name, spec in policy.secrets.items():
                if name in given:
                    values[name] = (given[name][0], tuple(spec.hosts))
                    continue
                old = self._values.get(name)
                if old is not None:
                    values[name] = (old[0], tuple(spec.hosts))
                    continue
                try:
                    values[name] = (resolve_source(name, spec.source), tuple(spec.hosts))
                except SecretError as exc:
                    errors.append(str(exc))
                    with contextlib.suppress(Exception):
                        self._audit_log.append("secret.unavailable", sandbox=self.sandbox_id,
                                               task=self.task_id, actor="proxy",
                                               details={"secret": name, "error": str(exc)})
            old_broker = self.broker
            broker = Broker(self.record.token, values, key=sentinel_key(self._home)) \
                if values else None
            for target in self._redacted:
                if broker is not None:
                    target.add_redactor(broker.scrub_text)
                if old_broker is not None:
                    target.remove_redactor(old_broker.scrub_text)
            self.broker = broker
            self._values = values
            self.errors = errors

    # -- closing -----------------------------------------------------------------
    def close(self) -> None:
        """Close the sockets and servers of this sandbox (idempotent). Some close at the
        event loop's next turn (``aclose`` waits for that)."""
        for c in self.closers:
            with contextlib.suppress(Exception):
                c.close()
        self.closers.clear()
        with self._broker_lock:
            if self.broker is not None:
                for target in self._redacted:
                    target.remove_redactor(self.broker.scrub_text)

    async def aclose(self, timeout: float = 5.0) -> None:
        """Close, and return once every listening socket is really closed, so the same
        ports can be bound again in the namespace at once. (A datagram transport
        closes its socket a loop turn after ``close``; a listening TCP socket at
        once: re-binding in between fails on UDP 53 only.)"""
        self.close()
        deadline = time.monotonic() + timeout
        while any(s.fileno() >= 0 for s in self.sockets.values()):
            if time.monotonic() > deadline:
                for s in self.sockets.values():
                    if s.fileno() >= 0:
                        log.warning("%s: the %s socket did not close in time; closing it",
                                    self.sandbox_id, s)
                        with contextlib.suppress(OSError):
                            s.close()
                break
            await asyncio.sleep(0.001)


def _closing(closer: Any) -> bool:
    """Whether a server, transport or task closer has closed or is closing."""
    is_serving = getattr(closer, "is_serving", None)
    if callable(is_serving):
        return not is_serving()
    is_closing = getattr(closer, "is_closing", None)
    if callable(is_closing):
        return bool(is_closing())
    done = getattr(closer, "done", None)
    if callable(done):
        return bool(done())
    return False
