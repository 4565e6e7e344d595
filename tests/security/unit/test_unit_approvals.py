"""Approvals in the store: hold, wait, decide (from another process too), time out."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from corral.errors import InvalidState
from corral.security.approvals import ApprovalNotFound, ApprovalQueue, request_shape
from corral.security.audit import AuditLog
from corral.security.types import Decision, RefUpdate, RequestView
from corral.store import Store

CORRAL = [sys.executable, "-m", "corral.cli.main"]


def view(path: str = "/repos/acme/app", **kw) -> RequestView:
    return RequestView(sandbox_id=kw.pop("sandbox", "sb-1"), scheme="https",
                       host="api.github.com", port=443, method=kw.pop("method", "DELETE"),
                       path=path, **kw)


ASK = Decision("ask", "deleting needs a human", 1)


def test_hold_approve_wait(store: Store, audit: AuditLog) -> None:
    q = ApprovalQueue(store, audit)
    ap = q.hold(view(task_id="T-1"), ASK, timeout=30)
    assert ap.status == "pending" and ap.id.startswith("ap-")
    assert ap.summary == "DELETE https://api.github.com/repos/acme/app"
    assert ap.reason == "deleting needs a human" and ap.task_id == "T-1"
    assert [r["id"] for r in q.list()] == [ap.id]
    threading.Timer(0.2, lambda: q.approve(ap.id, actor="user:alice")).start()
    t0 = time.monotonic()
    assert q.wait(ap.id, timeout=10) == "approved"
    assert time.monotonic() - t0 < 2
    got = q.get(ap.id)
    assert (got.status, got.actor) == ("approved", "user:alice")
    assert q.list() == [] and len(q.list(pending_only=False)) == 1
    events = [(r.event, r.actor, r.details["approval"]) for r in audit.records()]
    assert events == [("approval.requested", "proxy", ap.id),
                      ("approval.approved", "user:alice", ap.id)]


def test_deny_with_reason(store: Store, audit: AuditLog) -> None:
    q = ApprovalQueue(store, audit)
    ap = q.hold(view(), ASK, timeout=30)
    q.deny(ap.id, reason="not on a Friday", actor="user:bob")
    assert q.wait(ap.id, timeout=1) == "denied"
    got = q.get(ap.id)
    assert got.decision_reason == "not on a Friday" and got.actor == "user:bob"
    assert list(audit.records())[-1].details["reason"] == "not on a Friday"


def test_timeout_denies_and_cannot_be_approved_later(store: Store, audit: AuditLog) -> None:
    q = ApprovalQueue(store, audit)
    ap = q.hold(view(), ASK, timeout=30)
    t0 = time.monotonic()
    assert q.wait(ap.id, timeout=0.3) == "timeout"
    assert 0.25 < time.monotonic() - t0 < 2
    with pytest.raises(InvalidState, match="already timeout"):
        q.approve(ap.id)
    assert [r.event for r in audit.records()][-1] == "approval.timeout"


def test_first_decision_wins(store: Store) -> None:
    q = ApprovalQueue(store)
    ap = q.hold(view(), ASK, timeout=30)
    q.deny(ap.id)
    with pytest.raises(InvalidState, match="already denied"):
        q.approve(ap.id)
    with pytest.raises(ApprovalNotFound):
        q.approve("ap-nope")
    with pytest.raises(ApprovalNotFound):
        q.wait("ap-nope", 1)


def test_concurrent_deciders_only_one_wins(store: Store) -> None:
    q = ApprovalQueue(store)
    ap = q.hold(view(), ASK, timeout=30)
    results: list[str] = []

    def decide(i: int) -> None:
        try:
            (q.approve if i % 2 else q.deny)(ap.id)
            results.append("won")
        except InvalidState:
            results.append("lost")

    threads = [threading.Thread(target=decide, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["lost"] * 7 + ["won"]


def test_overdue_approvals_expire(store: Store) -> None:
    q = ApprovalQueue(store)
    ap = q.hold(view(), ASK, timeout=0)
    time.sleep(0.01)
    assert q.list() == []  # listing expires what is overdue (a proxy died holding it)
    assert q.get(ap.id).status == "timeout"


def test_cancel(store: Store) -> None:
    q = ApprovalQueue(store)
    ap = q.hold(view(), ASK, timeout=30)
    assert q.cancel(ap.id)
    assert q.get(ap.id).status == "denied" and not q.cancel(ap.id)


def test_request_shape_of_a_push() -> None:
    a, b = "a" * 40, "b" * 40
    v = view("/acme/app.git/git-receive-pack", method="POST",
             git_updates=(RefUpdate(a, b, "refs/heads/f"), RefUpdate(a, b, "refs/heads/main")))
    shape = request_shape(v, Decision("ask", "x", 3, "refs/heads/main"))
    assert shape["refs"] == ["refs/heads/main", "refs/heads/f"]
    assert shape["updates"][0] == {"old": a, "new": b, "ref": "refs/heads/f"}
    assert shape["method"] == "POST" and shape["port"] == 443


# -- from other processes: the CLI --------------------------------------------------


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CORRAL_HOME": str(home)}
    return subprocess.run([*CORRAL, *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_cli_ls_approve_deny_across_processes(tmp_path: Path) -> None:
    q = ApprovalQueue.for_home(tmp_path)
    held = q.hold(view(task_id="T-3"), ASK, timeout=60)
    r = cli(tmp_path, "approvals", "ls", "--json")
    assert r.returncode == 0, r.stderr
    import json

    rows = json.loads(r.stdout)
    assert [x["id"] for x in rows] == [held.id] and rows[0]["task"] == "T-3"
    r = cli(tmp_path, "approvals", "ls")
    assert held.id in r.stdout and "deleting needs a human" in r.stdout

    # the proxy waits in this process; a human approves from another
    box: list[str] = []
    waiter = threading.Thread(target=lambda: box.append(q.wait(held.id, timeout=30)))
    waiter.start()
    r = cli(tmp_path, "approvals", "approve", held.id, "--remember")
    assert r.returncode == 0, r.stderr
    assert "approved (remembered)" in r.stdout
    waiter.join(30)
    assert box == ["approved"]

    again = cli(tmp_path, "approvals", "approve", held.id)
    assert again.returncode == 2 and "already approved" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    other = q.hold(view("/x"), ASK, timeout=60)
    r = cli(tmp_path, "approvals", "deny", other.id, "--reason", "no thanks")
    assert r.returncode == 0, r.stderr
    assert q.get(other.id).decision_reason == "no thanks"
    assert cli(tmp_path, "approvals", "deny", "ap-missing").returncode == 2
    assert "no pending approvals" in cli(tmp_path, "approvals", "ls").stdout
    events = [r.event for r in AuditLog(tmp_path / "audit.jsonl").records()]
    assert events == ["approval.requested", "approval.approved", "approval.requested",
                      "approval.denied"]
