"""Live approvals: an ``ask`` holds the request while a human decides.

    queue = ApprovalQueue.for_home()                      # the store + the audit log
    ap = queue.hold(view, decision, timeout=engine.approval_timeout)   # a pending row
    status = queue.wait(ap.id, timeout=...)   # blocks (poll); call via asyncio.to_thread
    # elsewhere (CLI, API, dashboard):
    queue.approve(ap.id, remember=True, actor="user:alice")
    queue.deny(ap.id, reason="not today", actor="user:alice")

Every state change is one conditional UPDATE (``WHERE status = 'pending'``), so
the first decision wins even across processes, and an approval that timed out
cannot be approved afterwards. Each change is also an audit event
(``approval.requested`` / ``approved`` / ``denied`` / ``timeout``), which is
what a dashboard follows. ``--remember`` stores the exact request shape
(method, host, port, canonical path; the ref for pushes) for the sandbox, or
for the task when the request carried one; ``RememberedApprovals`` is how the
engine finds them.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update

from corral.errors import InvalidState, NotFound
from corral.security.audit import AuditLog, default_actor
from corral.security.canon import format_authority
from corral.security.types import Approval, Decision, RequestView
from corral.store import Store
from corral.store.models import utcnow
from corral.store.security_models import ApprovalRow, RememberedRow

__all__ = ["ApprovalNotFound", "ApprovalQueue", "RememberedApprovals", "request_shape", "summarize"]

FINAL = ("approved", "denied", "timeout")


class ApprovalNotFound(NotFound):
    """No approval has this id."""


def request_shape(req: RequestView, decision: Decision | None = None) -> dict[str, Any]:
    """What an approval (and a remembered approval) is about: the request's shape.

    For a push, ``refs`` lists the refs held for approval (the deciding ref
    first) and ``updates`` every ref update."""
    shape: dict[str, Any] = {
        "method": req.method, "scheme": req.scheme, "host": req.host, "port": req.port,
        "path": req.path, "query": req.query,
    }
    if req.git_updates:
        shape["updates"] = [asdict(u) for u in req.git_updates]
        refs = [u.ref for u in req.git_updates]
        if decision is not None and decision.ref in refs:
            refs.remove(decision.ref)
            refs.insert(0, decision.ref)
        shape["refs"] = refs
    return shape


def summarize(req: RequestView) -> str:
    """``POST https://github.com/acme/app.git/git-receive-pack (git push refs/heads/main)``."""
    url = f"{req.scheme}://{format_authority(req.host, req.port, req.scheme)}{req.path}"
    if req.query:
        url += "?" + req.query[:200]
    s = f"{req.method} {url}"
    if req.git_updates:
        s += " (git push " + ", ".join(u.ref for u in req.git_updates[:5]) + ")"
    return s


def _approval(row: ApprovalRow) -> Approval:
    return Approval(id=row.id, sandbox_id=row.sandbox_id, task_id=row.task_id,
                    summary=row.summary, reason=row.reason,
                    status=row.status,  # type: ignore[arg-type]
                    request=dict(row.request or {}), actor=row.actor,
                    decision_reason=row.decision_reason)


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


class ApprovalQueue:
    """Approvals in the store, shared by every process of an installation."""

    def __init__(self, store: Store, audit: AuditLog | None = None, *,
                 poll: float = 0.1) -> None:
        self.store = store
        self.audit = audit
        self.poll = poll

    @classmethod
    def for_home(cls, home: str | Path | None = None) -> ApprovalQueue:
        from corral.compute.context import get_context

        ctx = get_context(home)
        return cls(ctx.store, AuditLog(ctx.home / "audit.jsonl"))

    def _log(self, event: str, row: ApprovalRow, actor: str, **details: Any) -> None:
        if self.audit is not None:
            self.audit.append(event, sandbox=row.sandbox_id, task=row.task_id, actor=actor,
                              details={"approval": row.id, "summary": row.summary, **details})

    # -- the proxy's side --------------------------------------------------------

    def hold(self, req: RequestView, decision: Decision, *, timeout: float) -> Approval:
        """Record a pending approval for ``req`` (the proxy then ``wait``s on it)."""
        from corral.compute.context import new_id

        now = utcnow()
        row = ApprovalRow(id=new_id("ap"), sandbox_id=req.sandbox_id, task_id=req.task_id,
                          summary=summarize(req), reason=decision.reason, status="pending",
                          request=request_shape(req, decision), created_at=now,
                          expires_at=now + dt.timedelta(seconds=timeout), remember=False)
        with self.store.session() as s:
            s.add(row)
        self._log("approval.requested", row, "proxy", reason=decision.reason,
                  rule=decision.rule, ref=decision.ref, timeout=timeout)
        return _approval(row)

    def wait(self, approval_id: str, timeout: float) -> str:
        """Block until the approval is decided; after ``timeout`` seconds it is denied
        with status ``timeout``. Returns the final status."""
        deadline = time.monotonic() + timeout
        delay = min(self.poll, 0.02)
        while True:
            status = self.status(approval_id)
            if status != "pending":
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                return self._timeout(approval_id)
            time.sleep(min(delay, left))
            delay = min(delay * 1.5, self.poll)

    def cancel(self, approval_id: str, reason: str = "the client went away") -> bool:
        """Deny a pending approval on the proxy's behalf (e.g. the client disconnected)."""
        return self._decide(approval_id, "denied", "proxy", reason, remember=False) is not None

    def _timeout(self, approval_id: str) -> str:
        row = self._transition(approval_id, "timeout", "corral", "nobody decided in time")
        if row is not None:
            self._log("approval.timeout", row, "corral")
            return "timeout"
        return self.status(approval_id)

    # -- the human's side --------------------------------------------------------

    def approve(self, approval_id: str, *, remember: bool = False,
                actor: str | None = None) -> Approval:
        """Approve a pending request; with ``remember`` its exact shape is allowed from now
        on. Raises ``ApprovalNotFound`` or ``InvalidState`` (already decided)."""
        row = self._decide(approval_id, "approved", actor or default_actor(), None, remember)
        if row is None:
            self._already(approval_id)
        assert row is not None
        return _approval(row)

    def deny(self, approval_id: str, *, reason: str | None = None,
             actor: str | None = None) -> Approval:
        """Deny a pending request; ``reason`` is shown to the agent."""
        row = self._decide(approval_id, "denied", actor or default_actor(), reason, False)
        if row is None:
            self._already(approval_id)
        assert row is not None
        return _approval(row)

    def _already(self, approval_id: str) -> None:
        status = self.status(approval_id)
        raise InvalidState(f"approval {approval_id} is already {status}", state=status)

    def _decide(self, approval_id: str, status: str, actor: str, reason: str | None,
                remember: bool) -> ApprovalRow | None:
        self.expire_overdue()
        row = self._transition(approval_id, status, actor, reason, remember)
        if row is None:
            return None
        if remember and status == "approved":
            self._remember(row)
        self._log(f"approval.{status}", row, actor, reason=reason, remember=remember)
        return row

    def _transition(self, approval_id: str, status: str, actor: str, reason: str | None,
                    remember: bool = False) -> ApprovalRow | None:
        with self.store.session() as s:
            res = s.execute(
                update(ApprovalRow)
                .where(ApprovalRow.id == approval_id, ApprovalRow.status == "pending")
                .values(status=status, actor=actor, decision_reason=reason,
                        decided_at=utcnow(), remember=remember))
            if res.rowcount != 1:  # type: ignore[attr-defined]
                return None
            return s.get(ApprovalRow, approval_id)

    def _remember(self, row: ApprovalRow) -> None:
        req = row.request
        refs = req.get("refs") or [""]
        with self.store.session() as s:
            for ref in refs:
                s.add(RememberedRow(sandbox_id=row.sandbox_id, task_id=row.task_id,
                                    method=req["method"], host=req["host"],
                                    port=int(req["port"]), path=req["path"], ref=ref,
                                    approval_id=row.id))

    # -- reading -----------------------------------------------------------------

    def get(self, approval_id: str) -> Approval:
        with self.store.session() as s:
            row = s.get(ApprovalRow, approval_id)
            if row is None:
                raise ApprovalNotFound(f"no approval {approval_id} (see `corral approvals ls`)")
            return _approval(row)

    def status(self, approval_id: str) -> str:
        with self.store.session() as s:
            st = s.execute(select(ApprovalRow.status).where(ApprovalRow.id == approval_id)
                           ).scalar_one_or_none()
        if st is None:
            raise ApprovalNotFound(f"no approval {approval_id} (see `corral approvals ls`)")
        return st

    def list(self, *, pending_only: bool = True, sandbox_id: str | None = None,
             limit: int = 200) -> list[dict[str, Any]]:
        """Approvals, newest first, as dicts (the CLI's and the API's shape)."""
        self.expire_overdue()
        q = select(ApprovalRow).order_by(ApprovalRow.created_at.desc()).limit(limit)
        if pending_only:
            q = q.where(ApprovalRow.status == "pending")
        if sandbox_id is not None:
            q = q.where(ApprovalRow.sandbox_id == sandbox_id)
        with self.store.session() as s:
            rows = s.execute(q).scalars().all()
        return [{"id": r.id, "sandbox": r.sandbox_id, "task": r.task_id, "status": r.status,
                 "summary": r.summary, "reason": r.reason, "request": r.request,
                 "created_at": _aware(r.created_at).isoformat(),
                 "expires_at": _aware(r.expires_at).isoformat(),
                 "decided_at": _aware(r.decided_at).isoformat() if r.decided_at else None,
                 "actor": r.actor, "decision_reason": r.decision_reason,
                 "remember": r.remember} for r in rows]

    def expire_overdue(self) -> int:
        """Mark pending approvals past their deadline as ``timeout`` (a proxy that died
        while holding them leaves them behind). Returns how many."""
        now = utcnow()
        with self.store.session() as s:
            ids = s.execute(select(ApprovalRow.id).where(
                ApprovalRow.status == "pending", ApprovalRow.expires_at < now)).scalars().all()
        return sum(1 for i in ids if self._timeout(i) == "timeout")


class RememberedApprovals:
    """The engine's view of remembered approvals (``Engine(remembered=...)``)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def find(self, req: RequestView, ref: str | None) -> str | None:
        scope = RememberedRow.sandbox_id == req.sandbox_id
        if req.task_id:
            scope = or_(scope, RememberedRow.task_id == req.task_id)
        q = (select(RememberedRow.approval_id)
             .where(scope, RememberedRow.method == req.method, RememberedRow.host == req.host,
                    RememberedRow.port == req.port, RememberedRow.path == req.path,
                    RememberedRow.ref == (ref or ""))
             .limit(1))
        with self.store.session() as s:
            return s.execute(q).scalar_one_or_none()

    def forget(self, *, sandbox_id: str | None = None, task_id: str | None = None) -> int:
        """Drop remembered approvals of a sandbox or a task. Returns how many."""
        from sqlalchemy import delete

        q = delete(RememberedRow)
        if sandbox_id is not None:
            q = q.where(RememberedRow.sandbox_id == sandbox_id)
        if task_id is not None:
            q = q.where(RememberedRow.task_id == task_id)
        with self.store.session() as s:
            res = s.execute(q)
            return int(res.rowcount)  # type: ignore[attr-defined]
