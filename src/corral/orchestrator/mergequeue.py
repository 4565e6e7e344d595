"""The merge queue: corral alone moves main on the origin, strictly in order.

Approved tasks wait in the order they were approved. Each one's commits are
replayed (trees and commits only, no work tree) on top of the entry ahead of
it, the first on current main: a *train* of candidates, each exactly what main
would be once it lands. CI runs on the candidates speculatively and in
parallel (up to ``merge.speculate`` at once), skipping a tree that already
passed; landing stays strictly in order. When the head's CI passed, the head
and every candidate right behind it whose CI passed land together, in one
push. When a candidate fails, the ones behind it (built on it) are thrown away
and tested again without it. This is Zuul's dependent pipeline; with
``speculate: 1`` it is the plain one-at-a-time queue.

Landing is durable: the push is written to the outbox first, done with a lease
on the old main, and the tasks are marked merged in the transaction that
closes the entry; after a crash ``settle_outbox`` finds out whether the push
happened and finishes it either way. A conflict with main becomes the
``conflict`` reaction for the task's agent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from corral.errors import CorralError
from corral.orchestrator import sandboxes
from corral.orchestrator.ci import CIResult
from corral.orchestrator.gitops import ConflictFile
from corral.orchestrator.states import InvalidTransition, TaskState
from corral.store.orchestrator_models import OutboxRow, RunRow, TaskRow

if TYPE_CHECKING:
    from corral.orchestrator.engine import Orchestrator

log = logging.getLogger("corral.orchestrator")
S = TaskState


@dataclass
class Car:
    """One entry of the train: ``base`` (main, or the car ahead) plus a task's commits."""

    task_id: str
    #: the task's head commit the candidate was built from
    head: str
    base: str
    commit: str
    tree: str
    #: CI of the candidate; None when that exact tree passed before
    ci: Future[CIResult] | None = None

    def passed(self) -> bool | None:
        """True or False once CI is known, None while it runs."""
        if self.ci is None:
            return True
        if not self.ci.done():
            return None
        return self.ci.result().passed


class MergeQueue:
    def __init__(self, orch: Orchestrator) -> None:
        self.o = orch
        self.rec = orch.rec
        self.train: list[Car] = []
        #: CI runs at once, thrown-away ones included (they finish, unused)
        self._slots = threading.BoundedSemaphore(self.depth)

    @property
    def depth(self) -> int:
        return max(1, int(self.o.cfg.merge.speculate))

    def run(self) -> None:
        while not self.o.stopping.is_set():
            try:
                did = self.step()
            except Exception:
                log.exception("merge queue step failed")
                self.train.clear()
                did = False
            if not did:
                self.o.merge_wake.wait(0.2)
                self.o.merge_wake.clear()

    def _start_ci(self, t: TaskRow, commit: str, stage: str) -> Future[CIResult]:
        """CI of a candidate in a thread of its own (a daemon: a stopping run does not
        wait for it); the queue wakes when it ends."""
        fut: Future[CIResult] = Future()
        o = self.o

        def work() -> None:
            with self._slots:
                try:
                    res = o.run_ci(t.id, commit, stage, t.ci_rounds + 1)
                except Exception as exc:  # the machine, not the change: still not a pass
                    log.exception("task %s: CI could not run", t.id)
                    res = CIResult(False, 125, 0.0, "(ci)", f"CI could not run: {exc}")
                fut.set_result(res)
            o.merge_wake.set()

        threading.Thread(target=work, daemon=True, name=f"corral-ci-{t.id}").start()
        return fut

    def top(self) -> str | None:
        """The last candidate of the train (any thread may ask), or None."""
        train = self.train
        try:
            return train[-1].commit if train else None
        except IndexError:  # emptied meanwhile
            return None

    def queue(self) -> list[TaskRow]:
        """Approved tasks in landing order (those already merging first)."""
        tasks = self.rec.tasks(states=(S.QUEUED_TO_MERGE, S.MERGING))
        tasks.sort(key=lambda t: (t.state != S.MERGING.value, t.queued_at, t.position))
        return tasks

    def step(self) -> bool:
        """Move the queue on by one decision; False when there is nothing to do now."""
        if self.settle_outbox():
            return True
        queue = self.queue()
        if not queue:
            self.train.clear()
            return False
        for t in queue:
            if t.id in self.o.cancel_requests:
                self.cancel(t)  # never pushed: its car and the ones behind are rebuilt
                return True
        self._align(queue)
        head = queue[0]
        if head.state == S.QUEUED_TO_MERGE.value:  # at the head: its car is what lands next
            head = self.rec.transition(head.id, S.MERGING, expect=S.QUEUED_TO_MERGE)
            queue[0] = head
        if self.train and self.train[0].passed() is not None:
            return self._land()  # landing first: the cars behind can wait a moment
        built = self._extend(queue)
        if isinstance(built, list):
            self.conflict(head, self.o.main, built)
            return True
        return built

    # -- the train -------------------------------------------------------------
    def _align(self, queue: list[TaskRow]) -> None:
        """Keep the cars that still match the queue and sit on current main."""
        base = self.o.main
        keep: list[Car] = []
        for car, t in zip(self.train, queue, strict=False):
            if car.task_id != t.id or car.head != t.head_commit or car.base != base:
                break
            keep.append(car)
            base = car.commit
        self.train = keep

    def _extend(self, queue: list[TaskRow]) -> list[ConflictFile] | bool:
        """Build the car of the next entry (up to ``depth`` cars) and start its CI;
        True if one was built, so the queue looks again at once.

        Returns the conflicts when the head itself does not apply on main; an entry
        further back that does not apply on the cars ahead waits for them.
        """
        o = self.o
        if len(self.train) >= min(self.depth, len(queue)):
            return False
        t = queue[len(self.train)]
        if t.head_commit is None:
            return False
        base = self.train[-1].commit if self.train else o.main
        res = o.repo.merge(base, t.head_commit, method=o.cfg.merge.method, task_id=t.id,
                           title=str(t.spec.get("title") or t.id))
        if res.commit is None:
            return res.conflicts if not self.train else False
        car = Car(t.id, t.head_commit, base, res.commit, o.repo.tree(res.commit))
        if not o.tree_passed(car.tree):
            car.ci = self._start_ci(t, res.commit, "merge" if not self.train else "speculative")
        self.train.append(car)
        return True

    def _land(self) -> bool:
        """Land the head and the passed cars right behind it, or bounce a failed head."""
        if not self.train:
            return False
        head = self.train[0]
        ok = head.passed()
        if ok is None:
            return False  # its CI runs; a finished CI wakes the queue
        if not ok:
            self._ci_failed(head)
            return True
        landing = [head]
        for car in self.train[1:]:
            if car.passed() is not True:
                break
            landing.append(car)
        self.push(landing)
        return True

    def _ci_failed(self, car: Car) -> None:
        """CI failed on the head's candidate: the ci_failed reaction (or a human)."""
        from corral.orchestrator.worker import Stop, TaskWorker

        self.train.clear()  # everything behind was built on it
        assert car.ci is not None
        res = car.ci.result()
        if res.row_id is not None:
            self.o.relabel_ci(res.row_id, "merge")
        t = self.rec.task(car.task_id)
        try:
            TaskWorker(self.o, t.id).ci_failed(t, res, "merge", S.MERGING)
        except (Stop, InvalidTransition):
            return
        self.o.start_worker(t.id)

    # -- landing ---------------------------------------------------------------
    def push(self, cars: list[Car]) -> None:
        """Record the push in the outbox, push with a lease on main, mark them merged."""
        o = self.o
        old, new = o.main, cars[-1].commit
        landing = [{"id": c.task_id, "commit": c.commit, "base": c.base} for c in cars]
        with self.rec._tx() as s:
            for c in cars:
                row = s.get(TaskRow, (o.run_id, c.task_id))
                if row is not None and row.state == S.QUEUED_TO_MERGE.value:
                    self.rec.move(s, c.task_id, S.MERGING, expect=S.QUEUED_TO_MERGE)
            ob = OutboxRow(run_id=o.run_id, task_id=cars[0].task_id, kind="push_main",
                           payload={"old": old, "new": new, "tasks": landing},
                           created_at=time.time())
            s.add(ob)
            s.flush()
            ob_id = ob.id
        o.crash("before_push")
        if o.repo.push(o.origin, new, o.branch, old):
            o.crash("after_push")
            self.merged(ob_id, landing, new)
            return
        self.close_outbox(ob_id, "failed", "main moved on the origin")
        self.rec.event("push_rejected", cars[0].task_id, detail="main moved on the origin; "
                       "landing again on top of it")
        o.main = o.repo.fetch_origin(o.origin, o.branch) or o.main
        self.train.clear()

    def settle_outbox(self) -> bool:
        """Finish a push recorded before a crash, whether or not it happened; True if
        there was one to settle."""
        pending = self.rec.outbox_pending()
        if not pending:
            return False
        o = self.o
        for row in pending:
            new, old = row.payload["new"], row.payload["old"]
            landing = row.payload.get("tasks") or [
                {"id": row.task_id, "commit": new, "base": old}]
            remote = o.repo.fetch_origin(o.origin, o.branch)
            if remote == old and o.repo.push(o.origin, new, o.branch, old):
                remote = new
            elif remote == old:
                remote = o.repo.fetch_origin(o.origin, o.branch)
            if remote is not None and (remote == new or (
                    o.repo.rev(remote) and o.repo.is_ancestor(new, remote))):
                self.merged(row.id, landing, remote)
                continue
            self.close_outbox(row.id, "failed", "main moved before the push")
            o.main = remote or o.main
        self.train.clear()
        return True

    def close_outbox(self, ob_id: int, state: str, error: str | None = None) -> None:
        with self.rec._tx() as s:
            row = s.get(OutboxRow, ob_id)
            if row is not None:
                row.state, row.error, row.done_at = state, error, time.time()

    def merged(self, ob_id: int, landing: list[dict[str, str]], main: str) -> None:
        """One transaction: the outbox entry is done, main moved, the tasks merged.

        A crash before it leaves the entry pending (``settle_outbox`` finishes it);
        never half of it: a task whose push is recorded but whose state is not
        would be landed a second time.
        """
        o = self.o
        rows = {t.id: t for t in self.rec.tasks(states=(S.MERGING,))}
        with self.rec._tx() as s:
            ob = s.get(OutboxRow, ob_id)
            if ob is not None:
                ob.state, ob.done_at = "done", time.time()
            run = s.get(RunRow, o.run_id)
            if run is not None:
                run.main_commit = main
            for entry in landing:
                t = rows.get(entry["id"])
                if t is None or S(t.state) is not S.MERGING:
                    continue  # cannot happen while the queue owns them; be safe
                self.rec.move(s, t.id, S.MERGED, merged_commit=entry["commit"],
                              sandbox_id=None, memo=_landed_on(entry["base"]))
                s.add(self.rec.event_row("merged", t.id, commit=entry["commit"],
                                         previous_main=entry["base"]))
        o.main = main
        done = {e["id"] for e in landing}
        self.train = [c for c in self.train if c.task_id not in done]
        for entry in landing:
            t = rows.get(entry["id"])
            if t is None:
                continue
            o.retire(t.sandbox_id, t.snapshot_id)
        o.wake.set()

    def cancel(self, t: TaskRow) -> None:
        """Cancel a task waiting in the queue (before its push)."""
        try:
            self.rec.transition(t.id, S.CANCELLED, reason="cancelled by request")
        except InvalidTransition:
            return
        self.o.factory.destroy(t.sandbox_id)
        self.o.wake.set()

    def conflict(self, t: TaskRow, main: str, files: list[ConflictFile]) -> None:
        """The head does not apply on main: the conflict reaction, with main fetched
        into the agent's sandbox as origin/main (or a human, past max_conflicts)."""
        o = self.o
        self.train.clear()
        number = t.conflicts + 1
        max_conflicts = o.cfg.merge.max_conflicts
        self.rec.event("conflict", t.id, main=main, files=[f.path for f in files])
        if number > max_conflicts:
            self.rec.transition(t.id, S.NEEDS_HUMAN, expect=S.MERGING, conflicts=number,
                                reason=f"conflicts with main {number} times "
                                       f"(merge.max_conflicts is {max_conflicts})")
            o.factory.destroy(t.sandbox_id)
            return
        sbx = None
        if t.sandbox_id:
            try:
                from corral.compute.sandbox import Sandbox

                sbx = Sandbox.connect(t.sandbox_id, home=o.home)
                if sbx.state.value != "running":
                    sbx.resume()
                sandboxes.send_commit(o.repo, sbx, main, "refs/remotes/origin/main", o.hints())
            except CorralError:
                # unusable: the worker makes a new one from the task's head
                o.factory.destroy(t.sandbox_id)
                sbx = None
        payload = {"main_commit": main, "files": [f.to_json() for f in files],
                   "number": number, "max_conflicts": max_conflicts}
        self.rec.transition(t.id, S.RUNNING, expect=S.MERGING, conflicts=number,
                            base_commit=main, sandbox_id=sbx.id if sbx else None,
                            pending={"reaction": "conflict", "payload": payload})
        o.start_worker(t.id)


def _landed_on(base: str) -> Callable[[dict[str, Any]], None]:
    def note(m: dict[str, Any]) -> None:
        m["landed_on"] = base

    return note
