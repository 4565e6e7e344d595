"""Policy reload: edits to a policy file apply to new requests within a second.

    live = LivePolicy("policy.yaml", audit=log, remembered=RememberedApprovals(store))
    live.decide(view)            # a PolicyEngine: checks the file at most every 0.25 s
    live.reload()                # force a check now -> ReloadResult | None

A change is noticed by the file's identity (inode, size, mtime, ctime) and
confirmed by its content hash. A broken edit keeps the last good policy and is
reported: the ``ReloadResult`` says why, ``last_error`` keeps it, and the audit
log gets ``policy.rejected`` (``policy.reloaded`` on success). Listeners
(``on_change``) hear about every new good policy, e.g. to rebuild the secret
broker when the secrets section changed.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from corral.errors import ConfigError
from corral.security.audit import AuditLog
from corral.security.engine import Engine, RememberedLookup
from corral.security.policy import Policy, load_policy
from corral.security.types import Decision, IPAddress, RequestView

__all__ = ["LivePolicy", "ReloadResult"]


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    #: the one-line error of a rejected edit ("" when ok)
    error: str = ""
    summary: str = ""


class LivePolicy:
    """A ``PolicyEngine`` for one policy file that follows the file's edits."""

    def __init__(self, path: str | Path, *, audit: AuditLog | None = None,
                 remembered: RememberedLookup | None = None, defaults: Policy | None = None,
                 sandbox: str | None = None, interval: float = 0.25) -> None:
        """Loads the file now: raises ``ConfigError`` if the first version is broken."""
        self.path = Path(path)
        self.audit = audit
        self.sandbox = sandbox
        self.interval = interval
        self.last_error: str | None = None
        self._remembered = remembered
        self._defaults = defaults
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Policy], None]] = []
        self._stamp = self._stat()
        text = self._read()
        self._digest = hashlib.sha256(text).digest() if text is not None else b""
        self._engine = self._build(load_policy(self.path, defaults=defaults))
        self._checked = time.monotonic()

    # -- PolicyEngine ------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The current engine (after a check, rate-limited to ``interval``)."""
        self.maybe_reload()
        return self._engine

    @property
    def policy(self) -> Policy:
        return self.engine.policy

    def decide(self, req: RequestView) -> Decision:
        return self.engine.decide(req)

    def decide_address(self, host: str, port: int, addr: IPAddress) -> Decision:
        return self.engine.decide_address(host, port, addr)

    def upstream(self, host: str, port: int) -> tuple[str, int] | None:
        return self.engine.upstream(host, port)

    # -- reloading -----------------------------------------------------------------

    def on_change(self, fn: Callable[[Policy], None]) -> None:
        """Call ``fn(policy)`` after every successful reload."""
        self._listeners.append(fn)

    def maybe_reload(self) -> ReloadResult | None:
        """Check the file if ``interval`` has passed since the last check."""
        if time.monotonic() - self._checked < self.interval:
            return None
        return self.reload()

    def reload(self) -> ReloadResult | None:
        """Check the file now. None when it did not change."""
        with self._lock:
            self._checked = time.monotonic()
            stamp = self._stat()
            if stamp == self._stamp:
                return None
            self._stamp = stamp
            text = self._read()
            digest = hashlib.sha256(text).digest() if text is not None else b""
            if text is not None and digest == self._digest:
                return None
            self._digest = digest
            try:
                policy = load_policy(self.path, defaults=self._defaults)
            except ConfigError as exc:
                self.last_error = str(exc)
                self._audit("policy.rejected", error=self.last_error)
                return ReloadResult(False, self.last_error)
            self._engine = self._build(policy)
            self.last_error = None
        summary = policy.summary()
        self._audit("policy.reloaded", summary=summary)
        for fn in list(self._listeners):
            fn(policy)
        return ReloadResult(True, "", summary)

    def _build(self, policy: Policy) -> Engine:
        return Engine(policy, remembered=self._remembered)

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except OSError:
            return None

    def _audit(self, event: str, **details: str) -> None:
        if self.audit is not None:
            self.audit.append(event, sandbox=self.sandbox, actor="corral",
                              details={"path": str(self.path), **details})
