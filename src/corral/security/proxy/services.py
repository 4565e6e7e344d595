"""What every sandbox's traffic shares inside the proxy daemon: the audit writer,
the meter, the approval queue, the upstream pool and the thread pools for
blocking work (the store, approvals that wait for a human)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from corral.security.approvals import ApprovalQueue
from corral.security.audit import AuditLog
from corral.security.metering import Meter
from corral.security.proxy.upstream import UpstreamPool
from corral.store import Store

__all__ = ["AuditSink", "Services"]

log = logging.getLogger("corral.security.proxy")
T = TypeVar("T")


class AuditSink:
    """Writes the proxy's audit records without slowing requests down.

    Appending a record (canonical JSON, SHA-256 chain, file lock) costs tens of
    microseconds of Python; done in the daemon it would also take the GIL from the
    event loop at every request. So records go, as JSON lines, through a pipe to a
    small child process (``python -m corral.security.proxy.auditwriter``) that does
    the appending; a thread of the daemon only moves bytes into the pipe. Records
    keep the order in which they were emitted. Redactors (the brokers' scrubbers)
    run here, before anything leaves the daemon.
    """

    def __init__(self, audit: AuditLog) -> None:
        self.log = audit
        # replaced, never mutated: emit() in the event loop iterates a stable tuple while
        # attachments made in worker threads add and remove their brokers' scrubbers
        self._redactors: tuple[Callable[[str], str], ...] = ()
        self._redactors_lock = threading.Lock()
        self._q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._proc = self._start()
        self._thread = threading.Thread(target=self._run, name="corral-audit", daemon=True)
        self._thread.start()

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "corral.security.proxy.auditwriter", str(self.log.path)],
            stdin=subprocess.PIPE, close_fds=True)

    def add_redactor(self, fn: Callable[[str], str]) -> None:
        with self._redactors_lock:
            if fn not in self._redactors:
                self._redactors = (*self._redactors, fn)

    def remove_redactor(self, fn: Callable[[str], str]) -> None:
        with self._redactors_lock:
            self._redactors = tuple(r for r in self._redactors if r != fn)

    def emit(self, event: str, *, sandbox: str | None, task: str | None = None,
             actor: str = "proxy", **details: Any) -> None:
        fns = self._redactors
        if fns:
            details = _redact(details, fns)
        line = json.dumps({"event": event, "sandbox": sandbox, "task": task, "actor": actor,
                           "details": details}, default=str).encode() + b"\n"
        self._q.put(line)

    def _run(self) -> None:
        while True:
            item = self._q.get()
            batch = [item] if item is not None else []
            done = item is None
            while not done:
                try:
                    more = self._q.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    done = True
                else:
                    batch.append(more)
            if batch:
                self._write(b"".join(batch))
            if done:
                return

    def _write(self, data: bytes) -> None:
        for _attempt in (1, 2):
            stdin = self._proc.stdin
            try:
                assert stdin is not None
                stdin.write(data)
                stdin.flush()
                return
            except (OSError, ValueError, AssertionError):
                log.warning("the audit writer ended; starting it again")
                self._proc = self._start()
        log.error("cannot write %d bytes of audit records", len(data))

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread and the writer process."""
        self._q.put(None)
        self._thread.join(timeout)
        with contextlib.suppress(Exception):
            assert self._proc.stdin is not None
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def _redact(value: Any, fns: tuple[Callable[[str], str], ...]) -> Any:
    if isinstance(value, str):
        for fn in fns:
            value = fn(value)
        return value
    if isinstance(value, dict):
        return {k: _redact(v, fns) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v, fns) for v in value]
    return value


class Services:
    """The daemon-wide parts, built once."""

    def __init__(self, store: Store, audit: AuditLog) -> None:
        self.store = store
        self.audit_log = audit
        self.audit = AuditSink(audit)
        self.meter = Meter(store)
        self.approvals = ApprovalQueue(store, audit)
        self.pool = UpstreamPool()
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="corral-io")
        # held requests sleep in a thread each while a human decides
        self._held = ThreadPoolExecutor(max_workers=256, thread_name_prefix="corral-held")

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run short blocking work (the store) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def held(self, fn: Callable[..., T], *args: Any) -> T:
        """Run work that may block for minutes (waiting for an approval)."""
        return await asyncio.get_running_loop().run_in_executor(self._held, fn, *args)

    async def aclose(self) -> None:
        await self.pool.aclose()
        self.audit.close()
        with contextlib.suppress(Exception):
            self._io.shutdown(wait=False, cancel_futures=True)
            self._held.shutdown(wait=False, cancel_futures=True)
