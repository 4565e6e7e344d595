"""The orchestrator: one process drives one run of a plan to merged, CI-green main.

The main loop promotes tasks whose dependencies are merged, dispatches ready
ones to task workers (a thread each) within ``agents.max_parallel`` and the
budgets, hands approved ones to the merge queue (a thread), applies requests
from the inbox (reviews, cancels) and reloads the plan when its file changes.
It wakes on events, not on a timer, so a dependency's merge dispatches its
dependents within milliseconds.

Everything is in the store: ``Orchestrator.resume`` after ``kill -9`` settles
the outbox, destroys orphan sandboxes and carries every task on from its state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from corral.compute.context import get_context, new_id
from corral.config import RepoConfig
from corral.errors import ConfigError, CorralError, NotFound, UsageError
from corral.harness import Harness, get_harness
from corral.orchestrator import budgets, sandboxes
from corral.orchestrator.ci import CIResult, run_ci
from corral.orchestrator.clock import Clock, SystemClock
from corral.orchestrator.gitops import Repo
from corral.orchestrator.limits import ProxyLimits
from corral.orchestrator.mergequeue import MergeQueue
from corral.orchestrator.plan import Plan, load_plan
from corral.orchestrator.records import Records
from corral.orchestrator.states import InvalidTransition, TaskState
from corral.orchestrator.worker import TaskWorker
from corral.store.orchestrator_models import AttemptRow, CIRunRow, InboxRow, RunRow, TaskRow

log = logging.getLogger("corral.orchestrator")
S = TaskState
#: a run whose owner has not beaten its heart for this long is free to resume
LEASE_SECONDS = 10.0


class RunBusy(UsageError):
    """Another live orchestrator drives this run."""


def default_origin(repo: Path) -> str:
    r = subprocess.run(["git", "-C", str(repo), "config", "--get", "remote.origin.url"],
                       capture_output=True, text=True, check=False)
    url = r.stdout.strip()
    if not url:
        raise UsageError(f"{repo}: no origin to land on: set merge.origin in corral.yaml, "
                         "pass --origin, or add a git remote named origin")
    if "://" not in url and not url.startswith("/") and ":" not in url:
        url = str((repo / url).resolve())
    return url


class Orchestrator:
    """Drives one run. ``create`` a new one or ``resume`` one by id, then ``run()``."""

    def __init__(self, run_id: str, *, clock: Clock | None = None,
                 home: str | Path | None = None) -> None:
        self.ctx = get_context(home)
        self.home = self.ctx.home
        self.run_id = run_id
        self.clock: Clock = clock or SystemClock()
        self.rec = Records(self.ctx, run_id, self.clock.now)
        with self.ctx.store.session() as s:
            run = s.get(RunRow, run_id)
        if run is None:
            raise NotFound(f"no run with id {run_id!r}")
        self.run_dir = self.home / "runs" / run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.repo = Repo.open(self.run_dir / "repo.git")
        self.origin = run.origin
        self.branch = run.branch
        self.repo_dir = Path(run.repo)
        self.plan_path = Path(run.plan_path) if run.plan_path else None
        self.cfg = RepoConfig.model_validate(run.config)
        self.max_parallel = int(run.options.get("max_parallel") or self.cfg.agents.max_parallel)
        self.main: str = run.main_commit or ""
        self.wake = threading.Event()
        self.merge_wake = threading.Event()
        self.stopping = threading.Event()
        self.cancel_requests: set[str] = set()
        self._task_wakes: dict[str, threading.Event] = {}
        self._workers: dict[str, threading.Thread] = {}
        self._workers_lock = threading.Lock()
        self._harnesses: dict[str, Harness] = {}
        self._prebuild_commit: str | None = run.prebuild_commit
        self._plan_mtime = self._source_mtime()
        self._last_reload_check = 0.0
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{_starttime(os.getpid())}"
        self.factory: sandboxes.SandboxFactory
        #: the proxy limits of fenced turns (a no-op until ``_setup`` finds a policy)
        self.limits = ProxyLimits(None, lambda: self.cfg.budgets)
        #: called at named points ("turn_launched", "turn_finished", "before_push",
        #: "after_push"); tests kill the process there (``CORRAL_FAILPOINT``)
        self.crash_hook: Callable[[str], None] | None = _failpoint_from_env()
        self.on_update: Callable[[], None] | None = None
        self.queue: MergeQueue | None = None

    # -- creating and resuming -----------------------------------------------
    @classmethod
    def create(cls, plan: Plan, repo: Path, *, origin: str | None = None,
               plan_path: Path | None = None, max_parallel: int | None = None,
               clock: Clock | None = None, home: str | Path | None = None) -> Orchestrator:
        """Record a new run of ``plan`` (every task queued) and return its orchestrator."""
        ctx = get_context(home)
        repo = repo.resolve()
        origin = origin or plan.config.merge.origin or default_origin(repo)
        run_id = new_id("run", 8)
        with ctx.store.session() as s:
            s.add(RunRow(id=run_id, state="running", repo=str(repo),
                         plan_path=str(plan_path.resolve()) if plan_path else None,
                         origin=origin, branch=plan.config.merge.branch,
                         config=plan.config.model_dump(mode="json"),
                         options={"max_parallel": max_parallel} if max_parallel else {}))
            s.flush()
            for i, t in enumerate(plan.tasks):
                s.add(TaskRow(run_id=run_id, id=t.id, state=S.QUEUED.value,
                              spec=t.model_dump(mode="json"), position=i))
        orch = cls(run_id, clock=clock, home=home)
        orch.rec.event("run_created", origin=origin, tasks=plan.ids)
        return orch

    @classmethod
    def resume(cls, run_id: str, *, clock: Clock | None = None,
               home: str | Path | None = None) -> Orchestrator:
        return cls(run_id, clock=clock, home=home)

    # -- the run -------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Drive the run until no task can move; returns ``status()``. Blocks."""
        self._claim()
        self.rec.event("run_started", owner=self.owner)
        beat = threading.Thread(target=self._heartbeat, daemon=True, name="corral-heartbeat")
        beat.start()
        mq = None
        try:
            self._setup()
            self.queue = MergeQueue(self)
            mq = threading.Thread(target=self.queue.run, daemon=True,
                                  name="corral-merge-queue")
            mq.start()
            self._loop()
        finally:
            self.stopping.set()
            self.merge_wake.set()
            for e in self._task_wakes.values():
                e.set()
            for th in list(self._workers.values()):
                th.join(timeout=30)
            if mq is not None:
                mq.join(timeout=30)
            with contextlib.suppress(Exception):
                self.factory.close()
            self.rec.update_run(owner=None, heartbeat=0.0)
        return self.status()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def _claim(self) -> None:
        with self.rec._tx() as s:
            run = s.get(RunRow, self.run_id)
            assert run is not None
            if run.owner and run.owner != self.owner and time.time() - run.heartbeat < \
                    LEASE_SECONDS and _owner_alive(run.owner):
                raise RunBusy(f"run {self.run_id} is being driven by {run.owner}")
            run.owner, run.heartbeat = self.owner, time.time()
            if run.state not in ("running",):
                run.state = "running"
                run.finished_at = None

    def _heartbeat(self) -> None:
        while not self.stopping.wait(2.0):
            with contextlib.suppress(Exception):
                self.rec.update_run(heartbeat=time.time())
                with self.rec._tx() as s:
                    for t in s.scalars(select(TaskRow).where(
                            TaskRow.run_id == self.run_id, TaskRow.lease_owner == self.owner)):
                        t.lease_expires = time.time() + LEASE_SECONDS

    def _setup(self) -> None:
        main = self.repo.fetch_origin(self.origin, self.branch)
        if main is None:
            raise UsageError(f"the origin {self.origin} has no branch {self.branch!r}")
        self.main = main
        run = self.rec.run()
        if run.base_commit is None:
            self.rec.update_run(base_commit=main, main_commit=main)
        else:
            self.rec.update_run(main_commit=main)
        env = self._environment()
        self.factory = sandboxes.SandboxFactory(env, self.run_id, home=self.home,
                                                policy=_policy(self.cfg, self.repo_dir),
                                                spares=self.max_parallel)
        if self.factory.policy:
            self.limits = ProxyLimits(budgets.proxy_meter(self.ctx.store),
                                      lambda: self.cfg.budgets)
        self._recover()
        self.factory.warm()

    def _environment(self) -> str:
        """Build (or reuse) the prebuild from a checkout of current main."""
        from corral.compute import environment

        checkout = self.run_dir / "checkout"
        if checkout.exists():
            subprocess.run(["rm", "-rf", str(checkout)], check=False)
        self.repo.git("worktree", "prune")
        subprocess.run(["git", "-c", "core.hooksPath=/dev/null", "clone", "-q", "--no-hardlinks",
                        "--branch", self.branch, str(self.repo.path), str(checkout)],
                       check=False, capture_output=True,
                       env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1",
                            "GIT_CONFIG_GLOBAL": "/dev/null"})
        if not (checkout / ".git").exists():
            # the bare repo has no local branch yet: make one from the origin's
            self.repo.set_ref(f"refs/heads/{self.branch}", self.main)
            subprocess.run(["git", "-c", "core.hooksPath=/dev/null", "clone", "-q",
                            "--branch", self.branch, str(self.repo.path), str(checkout)],
                           check=True, capture_output=True)
        subprocess.run(["git", "-C", str(checkout), "checkout", "-q", "--detach", self.main],
                       check=True, capture_output=True)
        subprocess.run(["git", "-C", str(checkout), "remote", "remove", "origin"],
                       check=False, capture_output=True)
        name = "corral-" + environment.env_name(self.repo_dir)
        res = environment.build(checkout, name=name, home=self.home)
        heads_file = self.home / "runs" / "prebuild-heads.json"
        heads: dict[str, str] = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            heads = json.loads(heads_file.read_text())
        if not res.cached:
            heads[res.snapshot_id] = self.main
            heads_file.write_text(json.dumps(heads))
        self._prebuild_commit = heads.get(res.snapshot_id)
        self.rec.update_run(env_name=res.name, prebuild_commit=self._prebuild_commit)
        subprocess.run(["rm", "-rf", str(checkout)], check=False)
        return res.name

    def _recover(self) -> None:
        """After a crash: settle each task's state and destroy orphan sandboxes."""
        keep = set()
        for t in self.rec.tasks():
            st = S(t.state)
            if (t.memo or {}).get("cancel") and not st.terminal:
                self.cancel_requests.add(t.id)
            if st is S.PREPARING:
                self.factory.destroy(t.sandbox_id, wait=True)
                self.rec.transition(t.id, S.READY, sandbox_id=None,
                                    reason="resumed: preparing again")
            elif not st.terminal and t.sandbox_id:
                keep.add(t.sandbox_id)
        gone = self.factory.reconcile(keep)
        if gone:
            self.rec.event("reconciled", destroyed=gone)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            self.wake.clear()
            self._inbox()
            self._maybe_reload()
            # one read of the tasks a round, again only after this round moved some
            tasks = self.rec.tasks()
            if self._promote(tasks):
                tasks = self.rec.tasks()
            if self._dispatch(tasks):
                tasks = self.rec.tasks()
            self._ensure_workers(tasks)
            if self.on_update:
                with contextlib.suppress(Exception):
                    self.on_update()
            if self._finished():
                break
            self.clock.wait(self.wake, 0.25)

    def _promote(self, tasks: list[TaskRow]) -> bool:
        """Queued tasks whose dependencies all merged become ready; True if any did."""
        state = {t.id: S(t.state) for t in tasks}
        moved = False
        for t in tasks:
            if state[t.id] is S.QUEUED and all(
                    state.get(d) is S.MERGED for d in t.spec.get("depends_on", [])):
                with contextlib.suppress(InvalidTransition):
                    self.rec.transition(t.id, S.READY, expect=S.QUEUED, not_before=0.0)
                    moved = True
        return moved

    def _dispatch(self, tasks: list[TaskRow]) -> bool:
        """Start ready tasks within max_parallel and the budgets; True if any started."""
        started = False
        active = sum(1 for t in tasks if S(t.state).active)
        now = self.clock.now()
        run = self.rec.run()
        depth = self._depths(tasks)
        ready = [t for t in tasks if t.state == S.READY.value and t.not_before <= now]
        ready.sort(key=lambda t: (-depth.get(t.id, 0), t.position))
        for t in ready:
            if active >= self.max_parallel:
                return started
            blocked = budgets.dispatch_blocked(
                self.cfg.budgets, budgets.Spent(t.tokens, t.cost_usd),
                budgets.Spent(run.tokens, run.cost_usd))
            if blocked is not None:
                scope, why = blocked
                started = True  # a state changed all the same
                if scope == "task":
                    self.rec.transition(t.id, S.BUDGET_EXCEEDED, reason=why)
                    continue
                if not self.rec.run().error:
                    self.rec.update_run(error=why)
                    self.rec.event("run_budget_spent", detail=why)
                return started
            self.rec.transition(t.id, S.PREPARING, expect=S.READY, lease_owner=self.owner,
                                lease_expires=time.time() + LEASE_SECONDS)
            active += 1
            started = True
            self.start_worker(t.id)
        return started

    def _depths(self, tasks: list[TaskRow]) -> dict[str, int]:
        """How many tasks wait on each one, transitively: the critical path goes first."""
        children: dict[str, list[str]] = {t.id: [] for t in tasks}
        for t in tasks:
            for d in t.spec.get("depends_on", []):
                children.setdefault(d, []).append(t.id)
        memo: dict[str, int] = {}

        def height(x: str) -> int:
            if x not in memo:
                memo[x] = 1 + max((height(c) for c in children.get(x, [])), default=0)
            return memo[x]

        return {t.id: height(t.id) for t in tasks}

    def _ensure_workers(self, tasks: list[TaskRow]) -> None:
        for t in tasks:
            st = S(t.state)
            if st in (S.PREPARING, S.RUNNING, S.CI, S.CI_FAILED, S.CHANGES_REQUESTED) or (
                    st is S.REVIEW and self.review_mode(t) == "auto"):
                self.start_worker(t.id)
            elif st in (S.QUEUED_TO_MERGE, S.MERGING):
                self.merge_wake.set()

    def start_worker(self, task_id: str) -> None:
        """Make sure a worker drives ``task_id`` (never two: the main loop and the merge
        queue both call this)."""
        with self._workers_lock:
            th = self._workers.get(task_id)
            if th is not None and th.is_alive():
                return
            th = threading.Thread(target=TaskWorker(self, task_id).run, daemon=True,
                                  name=f"corral-task-{task_id}")
            self._workers[task_id] = th
            th.start()

    def _finished(self) -> bool:
        if any(th.is_alive() for th in self._workers.values()):
            return False
        tasks = self.rec.tasks()
        state = {t.id: S(t.state) for t in tasks}
        run = self.rec.run()
        for t in tasks:
            st = state[t.id]
            if st.terminal:
                continue
            if st is S.QUEUED:
                deps = [state.get(d) for d in t.spec.get("depends_on", [])]
                if any(d is not None and d.terminal and d is not S.MERGED for d in deps):
                    continue  # blocked for good by a dependency that will not merge
                if run.error:
                    continue
                return False
            if st is S.READY and run.error:
                continue  # the run budget is spent: nothing more starts
            return False
        final = "finished" if all(s is S.MERGED for s in state.values()) else (
            "budget_exceeded" if run.error else "incomplete")
        if run.error:
            for t in tasks:
                if state[t.id] in (S.QUEUED, S.READY):
                    with contextlib.suppress(InvalidTransition):
                        self.rec.transition(t.id, S.BUDGET_EXCEEDED, reason=run.error)
        if run.state == "cancelled":
            final = "cancelled"
        self.rec.update_run(state=final, finished_at=_utcnow())
        self.rec.event("run_finished", state=final)
        return True

    # -- inbox, reload ---------------------------------------------------------
    def _inbox(self) -> None:
        items = self.rec.inbox()
        approvals = [i for i in items if i.kind == "approve" and i.task_id]
        if approvals:
            self._approve(approvals)
        for item in items:
            if item in approvals:
                continue
            try:
                self._handle(item.kind, item.task_id, item.payload)
            except CorralError as exc:
                self.rec.event("inbox_rejected", item.task_id, request=item.kind, error=str(exc))
            self.rec.handled(item.id)

    def _handle(self, kind: str, task_id: str | None, payload: dict[str, Any]) -> None:
        if kind == "cancel":
            targets = [task_id] if task_id else [t.id for t in self.rec.tasks()]
            if task_id is None:
                self.rec.update_run(state="cancelled")
            for tid in targets:
                t = self.rec.task(tid)
                if S(t.state).terminal:
                    continue
                # written down first: a restart still knows the task is to be cancelled
                self.rec.update_task(tid, memo=lambda m: m.update(cancel=True))
                self.cancel_requests.add(tid)
                self.task_wake(tid).set()
                if S(t.state) in (S.QUEUED_TO_MERGE, S.MERGING):
                    self.merge_wake.set()  # the queue owns it: cancelled unless pushed
                    continue
                th = self._workers.get(tid)
                if th is None or not th.is_alive():
                    with contextlib.suppress(InvalidTransition):
                        self.rec.transition(tid, S.CANCELLED, expect=S(t.state),
                                            reason="cancelled by request")
                        self.factory.destroy(t.sandbox_id)
            return
        assert task_id is not None
        t = self.rec.task(task_id)
        if S(t.state) is not S.REVIEW:
            raise UsageError(f"task {task_id} is {t.state}, not waiting for review")
        by = payload.get("by") or "human"
        if kind == "reject":
            reason = payload.get("reason") or "changes requested"
            self.rec.event("review", task_id, decision="rejected", by=by, reason=reason)
            self.rec.transition(task_id, S.CHANGES_REQUESTED, expect=S.REVIEW, pending={
                "reaction": "changes_requested",
                "payload": {"comments": reason, "reviewer": by}})
            self.start_worker(task_id)

    def _approve(self, items: list[InboxRow]) -> None:
        """Approvals read together enter the merge queue together (one transaction), in
        plan order: the queue tests them as one train."""
        now = self.clock.now()
        with self.rec._tx() as s:
            for item in items:
                assert item.task_id is not None
                t = s.get(TaskRow, (self.run_id, item.task_id))
                if t is None or t.state != S.REVIEW.value:
                    state = t.state if t is not None else "unknown"
                    s.add(self.rec.event_row(
                        "inbox_rejected", item.task_id, request="approve",
                        error=f"task {item.task_id} is {state}, not waiting for review"))
                else:
                    s.add(self.rec.event_row("review", item.task_id, decision="approved",
                                             by=item.payload.get("by") or "human"))
                    self.rec.move(s, item.task_id, S.QUEUED_TO_MERGE, expect=S.REVIEW,
                                  queued_at=now)
                row = s.get(InboxRow, item.id)
                if row is not None:
                    row.handled_at = time.time()
        self.merge_wake.set()

    def _source_mtime(self) -> float:
        src = self.plan_path or (self.repo_dir / "corral.yaml")
        try:
            return src.stat().st_mtime
        except OSError:
            return 0.0

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._last_reload_check < 1.0:
            return
        self._last_reload_check = now
        mtime = self._source_mtime()
        if mtime == self._plan_mtime:
            return
        self._plan_mtime = mtime
        self.reload()

    def reload(self) -> bool:
        """Re-read the plan; a bad edit keeps the last good config (and says why)."""
        try:
            plan = load_plan(self.repo_dir, self.plan_path)
        except ConfigError as exc:
            log.warning("config reload rejected, keeping the last good config: %s", exc)
            self.rec.event("config_rejected", error=str(exc))
            return False
        self.cfg = plan.config
        self.rec.update_run(config=plan.config.model_dump(mode="json"))
        known = {t.id for t in self.rec.tasks()}
        added = [t for t in plan.tasks if t.id not in known]
        with self.rec._tx() as s:
            for i, t in enumerate(added, start=len(known)):
                s.add(TaskRow(run_id=self.run_id, id=t.id, state=S.QUEUED.value,
                              spec=t.model_dump(mode="json"), position=i))
        self._harnesses.clear()
        self.limits.refresh()  # the budgets may have changed
        self.rec.event("config_reloaded", added=[t.id for t in added])
        self.wake.set()
        return True

    # -- services for workers and the merge queue ----------------------------
    def crash(self, point: str) -> None:
        """A named point where a crash is worth testing (see ``crash_hook``)."""
        if self.crash_hook is not None:
            self.crash_hook(point)

    def task_wake(self, task_id: str) -> threading.Event:
        return self._task_wakes.setdefault(task_id, threading.Event())

    def review_mode(self, t: TaskRow) -> str:
        return str(t.spec.get("review") or self.cfg.review.mode)

    def harness_for(self, t: TaskRow) -> Harness:
        name = str(t.spec.get("harness") or self.cfg.agents.harness)
        h = self._harnesses.get(name)
        if h is None:
            a = self.cfg.agents
            opts: dict[str, Any] = {"command": a.command, "prompt_via": a.prompt_via,
                                    "follow_up_command": a.follow_up_command, **a.options}
            if a.install is not None:  # else agents.options.install, as before
                opts["install"] = a.install
            h = self._harnesses[name] = get_harness(name, opts)
        return h

    def branch_of(self, task_id: str) -> str:
        return f"corral/{task_id}"

    def task_ref(self, task_id: str) -> str:
        return f"refs/heads/corral/{task_id}"

    def queue_top(self) -> str | None:
        """The merge queue's last candidate: what a task approved now lands on."""
        q = self.queue
        return q.top() if q is not None else None

    def hints(self) -> list[str]:
        return [h for h in (self._prebuild_commit,) if h]

    def tree_passed(self, tree: str) -> bool:
        with self.ctx.store.session() as s:
            return s.scalars(select(CIRunRow).where(
                CIRunRow.run_id == self.run_id, CIRunRow.tree == tree,
                CIRunRow.passed.is_(True))).first() is not None

    def run_ci(self, task_id: str, commit: str, stage: str, round_: int) -> CIResult:
        n = round_
        log_path = self.run_dir / "tasks" / task_id / f"ci-{stage}-{n}-{commit[:10]}.log"
        self.rec.event("ci_started", task_id, stage=stage, commit=commit)
        res = run_ci(self.factory, self.repo, commit, self.cfg.ci.command, self.cfg.ci.timeout,
                     task_id, self.hints(), log_path)
        with self.rec._tx() as s:
            row = CIRunRow(run_id=self.run_id, task_id=task_id, stage=stage, commit=commit,
                           tree=self.repo.tree(commit), passed=res.passed,
                           exit_code=res.exit_code, seconds=res.seconds,
                           signature=res.signature, summary=res.summary(),
                           log_path=str(log_path), at=time.time())
            s.add(row)
            s.add(self.rec.event_row("ci_finished", task_id, stage=stage, passed=res.passed,
                                     exit_code=res.exit_code, seconds=round(res.seconds, 3)))
            s.flush()
            res.row_id = row.id
        return res

    def relabel_ci(self, row_id: int, stage: str) -> None:
        """A speculative CI run whose result was acted on counts as ``stage``."""
        with self.rec._tx() as s:
            row = s.get(CIRunRow, row_id)
            if row is not None:
                row.stage = stage

    def payload(self, t: TaskRow, reaction: str, extra: dict[str, Any]) -> dict[str, Any]:
        """The structured payload of a reaction for task ``t``."""
        spec = t.spec
        task = {"id": t.id, "title": spec.get("title", t.id),
                "description": spec.get("description", "")}
        base: dict[str, Any] = {"task": task, "branch": self.branch_of(t.id),
                                "workdir": "/workspace",
                "base_commit": t.base_commit or self.main,
                "ci_command": self.cfg.ci.command or "(none)"}
        if reaction == "start":
            deps = []
            for d in spec.get("depends_on", []):
                dt = self.rec.task(d)
                landed = (dt.memo or {}).get("landed_on")
                summary = ""
                if dt.merged_commit and landed:
                    with contextlib.suppress(CorralError):
                        summary = self.repo.diff_stat(landed, dt.merged_commit)
                deps.append({"id": d, "title": dt.spec.get("title", d),
                             "merged_commit": dt.merged_commit or "", "diff_summary": summary})
            base["dependencies"] = deps
        if reaction == "retry":
            base["attempt"] = t.attempts
            base["previous"] = self.previous_attempts(t)
        return {**base, **extra}

    def previous_attempts(self, t: TaskRow) -> list[dict[str, Any]]:
        fails = list((t.memo or {}).get("failures", []))
        with self.ctx.store.session() as s:
            rows = list(s.scalars(select(AttemptRow).where(
                AttemptRow.run_id == self.run_id, AttemptRow.task_id == t.id)
                .order_by(AttemptRow.number)))
        out = []
        for i, r in enumerate(rows[:-1]):
            out.append({"number": r.number, "outcome": r.outcome or "did not succeed",
                        "summary": fails[i] if i < len(fails) else ""})
        return out

    def failure_summary(self, t: TaskRow) -> list[str]:
        memo = t.memo or {}
        out = [str(f) for f in memo.get("failures", [])]
        with self.ctx.store.session() as s:
            cis = list(s.scalars(select(CIRunRow).where(
                CIRunRow.run_id == self.run_id, CIRunRow.task_id == t.id,
                CIRunRow.passed.is_(False)).order_by(CIRunRow.id)))
        for c in cis[-3:]:
            tests = ", ".join(c.summary.get("failing_tests", [])[:5])
            out.append(f"CI ({c.stage}) failed with exit {c.exit_code}"
                       + (f": {tests}" if tests else ""))
        return out

    def retire(self, sandbox_id: str | None, snapshot_id: str | None) -> None:
        """Destroy a finished task's sandbox, then its snapshot (once nothing stands on
        it), in the background; the run waits for both before it returns."""
        from corral.compute.sandbox import Sandbox

        def drop() -> None:
            if snapshot_id:
                with contextlib.suppress(CorralError):
                    Sandbox.delete_snapshot(snapshot_id, home=self.home)

        self.factory.destroy(sandbox_id, then=drop)

    # -- reading -------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return run_status(self.run_id, home=self.home)


def run_status(run_id: str, *, home: str | Path | None = None) -> dict[str, Any]:
    """Everything ``corral status`` shows about a run, JSON-ready."""
    ctx = get_context(home)
    with ctx.store.session() as s:
        run = s.get(RunRow, run_id)
        if run is None:
            raise NotFound(f"no run with id {run_id!r}")
        tasks = list(s.scalars(select(TaskRow).where(TaskRow.run_id == run_id)
                               .order_by(TaskRow.position)))
        cis = list(s.scalars(select(CIRunRow).where(CIRunRow.run_id == run_id)))
    ci_by: dict[str, list[CIRunRow]] = {}
    for c in cis:
        ci_by.setdefault(c.task_id, []).append(c)
    return {
        "run": run.id, "state": run.state, "origin": run.origin, "branch": run.branch,
        "repo": run.repo, "base_commit": run.base_commit, "main_commit": run.main_commit,
        "tokens": run.tokens, "cost_usd": round(run.cost_usd, 4), "error": run.error,
        "owner": run.owner,
        "created_at": run.created_at.isoformat() if run.created_at else None,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "tasks": [{
            "id": t.id, "title": t.spec.get("title"), "state": t.state,
            "depends_on": t.spec.get("depends_on", []), "merged_commit": t.merged_commit,
            "head_commit": t.head_commit, "attempts": t.attempts, "ci_rounds": t.ci_rounds,
            "ci_runs": len(ci_by.get(t.id, [])),
            # a speculative run that failed was thrown away unless it came to count
            "ci_failures": sum(1 for c in ci_by.get(t.id, [])
                               if not c.passed and c.stage != "speculative"),
            "conflicts": t.conflicts, "stuck_level": t.stuck_level, "tokens": t.tokens,
            "sandbox": t.sandbox_id, "reason": t.reason,
        } for t in tasks],
    }


def latest_run(home: str | Path | None = None) -> str:
    ctx = get_context(home)
    with ctx.store.session() as s:
        row = s.scalars(select(RunRow).order_by(RunRow.created_at.desc())).first()
    if row is None:
        raise NotFound("no runs yet; start one with `corral run`")
    return row.id


def _policy(cfg: RepoConfig, repo: Path) -> Any:
    """The network policy file sandboxes are fenced with (``policy:`` in corral.yaml)."""
    extra = cfg.model_extra or {}
    path = getattr(cfg, "policy", None) or extra.get("policy")
    if not path:
        return None
    if isinstance(path, dict):  # the inline policy section (security layer's shape)
        from corral.security.policy import load_repo_policy

        return load_repo_policy(repo)
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else repo / p


def _utcnow() -> Any:
    from corral.store.models import utcnow

    return utcnow()


def _failpoint_from_env() -> Callable[[str], None] | None:
    """``CORRAL_FAILPOINT=<point>`` makes the process kill -9 itself at that point:
    how the crash-resume tests stop an orchestrator at an exact moment."""
    want = os.environ.get("CORRAL_FAILPOINT")
    if not want:
        return None

    def hook(point: str) -> None:
        if point == want:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _starttime(pid: int) -> str:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
        return data[data.rindex(b")") + 2:].split()[19].decode()
    except (OSError, IndexError, ValueError):
        return "0"


def _owner_alive(owner: str) -> bool:
    host, _, rest = owner.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname():
        return True  # cannot tell: trust the heartbeat
    try:
        return _starttime(int(pid)) == start
    except ValueError:
        return False
