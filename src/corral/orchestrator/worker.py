"""The task worker: drives one task from preparing through running and CI.

One thread per active task. Every step reads the task from the store, does
one piece of work and records the outcome as a transition, so a worker can
stop at any point (a crash, a cancel) and a new one picks up where it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.compute.sandbox import Sandbox
from corral.errors import CorralError
from corral.harness import AgentContext, EventLog, Prompt, Turn
from corral.harness.base import STATE_DIR, open_gate
from corral.harness.events import EventKind
from corral.orchestrator import budgets, reactions, sandboxes, stuck
from corral.orchestrator.limits import FencedTurn, TurnGuard
from corral.orchestrator.states import InvalidTransition, TaskState
from corral.store.orchestrator_models import AttemptRow, CIRunRow, TaskRow

if TYPE_CHECKING:
    from corral.compute.commands import CommandHandle
    from corral.orchestrator.engine import Orchestrator

log = logging.getLogger("corral.orchestrator")
S = TaskState


class Stop(Exception):
    """The worker must stop: the task was cancelled or moved by someone else."""


class TaskWorker:
    def __init__(self, orch: Orchestrator, task_id: str) -> None:
        self.o = orch
        self.id = task_id
        self.rec = orch.rec

    # -- the loop ------------------------------------------------------------
    def run(self) -> None:
        try:
            while not self.o.stopping.is_set():
                t = self.rec.task(self.id)
                st = S(t.state)
                if self.id in self.o.cancel_requests:
                    self._cancel(t)
                    return
                if st is S.PREPARING:
                    self.prepare(t)
                elif st is S.RUNNING:
                    self.running(t)
                elif st is S.CI:
                    self.ci(t)
                elif st in (S.CI_FAILED, S.CHANGES_REQUESTED):
                    self.rec.transition(self.id, S.RUNNING, expect=st)
                elif st is S.REVIEW and self.o.review_mode(t) == "auto":
                    self.rec.event("review", self.id, decision="approved", by="auto")
                    self.rec.transition(self.id, S.QUEUED_TO_MERGE, expect=st,
                                        queued_at=self.o.clock.now())
                    self.o.merge_wake.set()
                else:
                    return
        except (Stop, InvalidTransition):
            return
        except Exception as exc:  # a bug or a broken machine: never leave the task hanging
            log.exception("task %s: worker failed", self.id)
            self._fail_safe(f"internal error: {exc}")
        finally:
            self.o.wake.set()

    def _fail_safe(self, why: str) -> None:
        with contextlib.suppress(Exception):
            t = self.rec.task(self.id)
            if not S(t.state).terminal:
                self.retry_or_fail(t, why)

    def _cancel(self, t: TaskRow) -> None:
        if not S(t.state).terminal:
            self.rec.transition(self.id, S.CANCELLED, reason="cancelled by request")
            self.o.factory.destroy(t.sandbox_id)

    # -- preparing -----------------------------------------------------------
    def prepare(self, t: TaskRow) -> None:
        fresh = bool(t.pending.get("fresh"))
        number = t.attempts + 1
        log_path = self.o.run_dir / "tasks" / self.id / f"attempt-{number}.jsonl"
        with self.rec._tx() as s:
            s.add(AttemptRow(run_id=self.o.run_id, task_id=self.id, number=number,
                             log_path=str(log_path), started_at=time.time()))
        self.rec.update_task(self.id, attempts=number, turn_command=None, session_id=None,
                             memo=lambda m: m.pop("launch", None))
        try:
            sbx = self.new_sandbox(t, from_snapshot=fresh)
        except CorralError as exc:
            self.rec.event("prepare_failed", self.id, error=str(exc))
            self.retry_or_fail(self.rec.task(self.id), f"could not prepare a sandbox: {exc}")
            return
        reaction = "retry" if number > 1 else "start"
        self.rec.transition(self.id, S.RUNNING, expect=S.PREPARING, sandbox_id=sbx.id,
                            pending={"reaction": reaction, "new_session": True},
                            lease_owner=self.o.owner)

    def new_sandbox(self, t: TaskRow, *, from_snapshot: bool = False,
                    at: str | None = None) -> Sandbox:
        """A sandbox for the task's agent: its last good snapshot, or the prebuild with
        the repo at ``at`` (default: current main) on branch corral/<task>."""
        if t.sandbox_id:
            self.o.factory.destroy(t.sandbox_id)
        sbx = None
        if from_snapshot and t.snapshot_id:
            with contextlib.suppress(CorralError):
                sbx = self.o.factory.fork(t.snapshot_id, "agent", self.id)
        if sbx is None:
            sbx = self.o.factory.create("agent", self.id)
        self.rec.update_task(self.id, sandbox_id=sbx.id)
        try:
            harness = self.o.harness_for(t)
            harness.setup(sbx, self.agent_context(t))
            if not (from_snapshot and t.snapshot_id):
                start = at or self.o.main
                sandboxes.prepare_workspace(self.o.repo, sbx, start, self.o.branch_of(self.id),
                                            self.o.hints())
                if at is not None:  # the work so far on its branch, current main beside it
                    sandboxes.send_commit(self.o.repo, sbx, self.o.main,
                                          "refs/remotes/origin/main", self.o.hints())
                self.rec.update_task(self.id, base_commit=self.o.main if at is None
                                     else t.base_commit)
        except BaseException:
            self.o.factory.destroy(sbx)
            self.rec.update_task(self.id, sandbox_id=None)
            raise
        return sbx

    def agent_context(self, t: TaskRow) -> AgentContext:
        opts: dict[str, Any] = dict(t.spec.get("options") or {})
        if t.spec.get("script") is not None:
            opts["script"] = t.spec["script"]
        turns = int((t.memo or {}).get("turns", 0))
        return AgentContext(task_id=self.id, env=dict(sandboxes.GIT_ENV), options=opts,
                            turn=turns)

    # -- running -------------------------------------------------------------
    def running(self, t: TaskRow) -> None:
        sbx = self._sandbox(t)
        if sbx is None:
            # the sandbox is gone (a crash, a reboot): a new one, with the work so far
            try:
                sbx = self.new_sandbox(t, at=t.head_commit or None)
            except CorralError as exc:
                self.retry_or_fail(t, f"could not recreate the sandbox: {exc}")
                return
            t = self.rec.task(self.id)
            if t.turn_command:
                self.rec.update_task(self.id, turn_command=None)
                t = self.rec.task(self.id)
        outcome, detail = self.turn(t, sbx)
        self.o.crash(f"turn_{outcome}")
        t = self.rec.task(self.id)
        if outcome == "cancelled":
            self._cancel(t)
            raise Stop
        if outcome == "budget":
            self.rec.transition(self.id, S.BUDGET_EXCEEDED, expect=S.RUNNING, reason=detail)
            self.o.factory.destroy(t.sandbox_id)
            raise Stop
        if outcome == "stuck":
            self.climb(t, [detail])
            return
        if outcome == "failed":
            self.retry_or_fail(t, detail)
            return
        self.after_turn(t, sbx)

    def _sandbox(self, t: TaskRow) -> Sandbox | None:
        if not t.sandbox_id:
            return None
        try:
            sbx = Sandbox.connect(t.sandbox_id, home=self.o.home)
            if sbx.state.value != "running":
                sbx.resume()
            return sbx
        except CorralError:
            return None

    def turn(self, t: TaskRow, sbx: Sandbox) -> tuple[str, str]:
        """Run (or re-attach to) one agent turn; returns (outcome, detail) with outcome
        one of finished | failed | stuck | budget | cancelled.

        Crash-safe: the reaction is written down (``memo.launch``) before the turn
        is launched, the turn's command id once it is, and only then may the agent
        start (it waits at a gate until then). A restart finds either the command
        and re-attaches, even to a turn that already ended, so a finished turn is
        never run twice; or a launch cut short, whose command (if it got that far)
        still waits at its gate: it is adopted, or the sandbox's processes are
        ended and the same reaction is launched again, as the same occurrence.
        """
        harness = self.o.harness_for(t)
        memo = dict(t.memo or {})
        attempt = self._attempt()
        elog = EventLog(Path(attempt.log_path))
        gate = f"{STATE_DIR}/gate-{int(memo.get('turns', 0))}"
        if t.turn_command:
            try:
                turn = harness.attach(sbx, t.turn_command)
                open_gate(sbx, gate)  # recorded; perhaps not let go before a crash
            except CorralError:
                self.rec.update_task(self.id, turn_command=None)
                return "failed", "the agent's turn was lost in a restart"
            return self._watch(t, sbx, turn, elog, attempt.id,
                               int(memo.get("turn_usage_seen", 0)),
                               self._fence(t, sbx, attempt, memo.get("meter_base")))
        launch = memo.get("launch")
        fenced = None
        if launch:
            fenced = self._fence(t, sbx, attempt, memo.get("meter_base"))
            found = self._launched(sbx, float(launch.get("at", 0.0)))
            if found is not None:
                self.rec.event("relaunch", self.id, reaction=launch["reaction"],
                               adopted=found.id, detail="a crash cut the turn's launch "
                               "short; its command waited at the gate and is adopted")
                self.rec.update_task(self.id, turn_command=found.id,
                                     memo=lambda m: m.pop("launch", None))
                open_gate(sbx, gate)
                return self._watch(t, sbx, harness.attach(sbx, found.id), elog, attempt.id,
                                   int(memo.get("turn_usage_seen", 0)), fenced)
            self.rec.event("relaunch", self.id, reaction=launch["reaction"],
                           detail="a crash cut the turn's launch short: the sandbox's "
                                  "processes are restarted and the reaction sent again")
            sbx.stop()  # a launch half made, held at its gate: end it, keep the files
            sbx.resume()
        else:
            pending = dict(t.pending or {"reaction": "start"})
            name = str(pending.get("reaction", "start"))
            counts = dict(memo.get("reactions", {}))
            counts[name] = int(counts.get(name, 0)) + 1
            launch = {"reaction": name, "occurrence": counts[name], "at": time.time(),
                      "turn": int(memo.get("turns", 0)) + 1,
                      "new_session": bool(pending.get("new_session")) or not t.session_id}
            turns = launch["turn"]
            # the sandbox's proxy limit is set before the agent may call a model
            fenced = self._fence(t, sbx, attempt, None)
            base = fenced.to_memo() if fenced else None
            self.rec.memo(self.id, lambda m: m.update(reactions=counts, turns=turns,
                                                      turn_usage_seen=0, launch=launch,
                                                      meter_base=base))
            t = self.rec.task(self.id)
            gate = f"{STATE_DIR}/gate-{turns}"
        name, occurrence = str(launch["reaction"]), int(launch["occurrence"])
        pending = dict(t.pending or {})
        payload = self.o.payload(t, name, pending.get("payload") or {})
        try:
            text = reactions.render(name, payload, self.o.cfg.prompts)
        except CorralError as exc:
            self.rec.update_task(self.id, memo=lambda m: m.pop("launch", None))
            return "failed", str(exc)
        prompt = Prompt(text, name, occurrence)
        ctx = dataclasses.replace(self.agent_context(t), gate=gate)
        self.rec.event("reaction", self.id, reaction=name, occurrence=occurrence,
                       prompt=text[:4000])
        self.o.crash("turn_launching")
        turn = (harness.start(sbx, ctx, prompt) if launch.get("new_session")
                else harness.follow_up(sbx, ctx, prompt, t.session_id))
        self.o.crash("turn_launched")
        self.rec.update_task(self.id, turn_command=turn.id,
                             memo=lambda m: m.pop("launch", None))
        self.o.crash("turn_recorded")
        open_gate(sbx, gate)
        with self.rec._tx() as s:
            row = s.get(AttemptRow, attempt.id)
            if row is not None:
                row.turns += 1
                row.sandbox_id = sbx.id
        return self._watch(t, sbx, turn, elog, attempt.id, 0, fenced)

    def _fence(self, t: TaskRow, sbx: Sandbox, attempt: AttemptRow,
               base: dict[str, Any] | None) -> FencedTurn | None:
        """In a fenced run: set the sandbox's proxy limit to what is left of the budgets
        (``base``: the turn's memo, when re-attaching to it). None when not fenced."""
        limits = self.o.limits
        if limits.meter is None:
            return None
        run = self.rec.run()
        return limits.begin(self.id, sbx.id, attempt=budgets.Spent(attempt.tokens,
                            attempt.cost_usd), task=budgets.Spent(t.tokens, t.cost_usd),
                            run=budgets.Spent(run.tokens, run.cost_usd), base=base)

    def _launched(self, sbx: Sandbox, since: float) -> CommandHandle | None:
        """The agent command an interrupted launch started (the newest since ``since``);
        older ones from earlier interrupted launches are ended."""
        found = [h for h in sbx.commands.list() if h.started_at >= since]
        for h in found[:-1]:
            h.kill()
        return found[-1] if found else None

    def _attempt(self) -> AttemptRow:
        from sqlalchemy import select

        with self.rec.ctx.store.session() as s:
            row = s.scalars(select(AttemptRow).where(
                AttemptRow.run_id == self.o.run_id, AttemptRow.task_id == self.id)
                .order_by(AttemptRow.number.desc())).first()
        if row is None:  # resumed into running without an attempt row
            path = self.o.run_dir / "tasks" / self.id / "attempt-1.jsonl"
            with self.rec._tx() as s:
                row = AttemptRow(run_id=self.o.run_id, task_id=self.id, number=1,
                                 log_path=str(path), started_at=time.time())
                s.add(row)
        return row

    def _watch(self, t: TaskRow, sbx: Sandbox, turn: Turn, elog: EventLog, attempt_id: int,
               skip_usage: int, fenced: FencedTurn | None) -> tuple[str, str]:
        wake = self.o.task_wake(self.id)
        seen = [skip_usage]  # usage reports of the turn read so far

        def charge(spent: budgets.Spent) -> str | None:
            return self._charge(attempt_id, spent.tokens, spent.usd, seen[0])

        # one source of usage per turn: the harness's reports, or (a harness that
        # reports none, in a fenced sandbox) what the proxy metered
        guard = None if fenced is None else TurnGuard(
            self.o.limits, fenced, charge=charge,
            from_meter=not self.o.harness_for(t).reports_usage)
        try:
            with _ExitWaker(turn.handle.pid, wake) as waker:
                # the end of the turn wakes the loop: polls only read its output then
                longest = 0.25 if waker.active else 0.05
                return self._watch_loop(t, sbx, turn, elog, attempt_id, skip_usage, wake,
                                        longest, guard, seen)
        finally:
            try:
                if guard is not None and not guard.settled:
                    guard.settle()  # a turn stopped early: what it spent still counts
            except Exception:
                log.exception("task %s: could not settle the turn's metered usage", self.id)
            self.o.limits.end(self.id)

    def _watch_loop(self, t: TaskRow, sbx: Sandbox, turn: Turn, elog: EventLog,
                    attempt_id: int, skip_usage: int, wake: threading.Event, longest: float,
                    guard: TurnGuard | None, seen: list[int]) -> tuple[str, str]:
        clock = self.o.clock
        cfg = self.o.cfg
        started = last = clock.now()
        last_fp: str | None = None
        usage_seen = 0
        delay = 0.005
        while True:
            wake.clear()  # before looking: a wake-up after this is not lost
            events = turn.poll()
            if events:
                elog.append(events)
                last, last_fp = clock.now(), None
                delay = 0.005
            for ev in events:
                if ev.kind is not EventKind.USAGE or (guard is not None and guard.from_meter):
                    continue
                usage_seen += 1
                if usage_seen <= skip_usage:
                    continue  # charged before a restart
                seen[0] = usage_seen
                why = self._charge(attempt_id, ev.tokens, ev.cost_usd, usage_seen)
                if why:
                    turn.stop(grace=0.2)
                    self.rec.event("budget_exceeded", self.id, detail=why)
                    self._end_turn(turn)
                    return "budget", why
            if guard is not None and (turn.done or guard.due()):
                # the meter: charges for a harness without usage reports, and the
                # proxy's refusals, which an agent may well shrug off (exit 0)
                why = guard.settle() if turn.done else guard.poll()
                if why:
                    turn.stop(grace=0.2)
                    self.rec.event("budget_exceeded", self.id, detail=why)
                    self._end_turn(turn)
                    return "budget", why
            if turn.done:
                self._end_turn(turn)
                if turn.exit_code != 0:
                    return "failed", f"the agent exited with code {turn.exit_code}"
                return "finished", ""
            if self.id in self.o.cancel_requests or self.o.stopping.is_set():
                turn.stop(grace=0.2)
                self._end_turn(turn)
                return "cancelled", "cancelled"
            now = clock.now()
            if now - started >= cfg.agents.turn_timeout:
                turn.stop(grace=0.5)
                self._end_turn(turn)
                limit = cfg.agents.turn_timeout
                return "failed", f"the turn ran past agents.turn_timeout ({limit:.0f}s)"
            silence = cfg.stuck.silence
            if last_fp is None and stuck.silent(now, last, silence / 2):
                last_fp = sandboxes.fingerprint(sbx)  # the baseline for "no change"
            if stuck.silent(now, last, silence):
                fp = sandboxes.fingerprint(sbx)
                if fp != last_fp:  # quiet, but the workspace moved: that is activity
                    last_fp, last = fp, now
                else:
                    turn.stop(grace=0.2)
                    self._end_turn(turn)
                    return "stuck", f"no output and no workspace change for {silence:.0f}s"
            clock.wait(wake, delay)
            delay = min(delay * 2, longest)

    def _end_turn(self, turn: Turn) -> None:
        """The turn ended: remember its session. Its command id stays until what it
        did is recorded (a transition clears it), so a restart re-reads the turn
        instead of running it again."""
        if turn.session_id:
            self.rec.update_task(self.id, session_id=turn.session_id)

    def _charge(self, attempt_id: int, tokens: int, cost: float, seen: int) -> str | None:
        a_tok, a_usd, t_tok, t_usd, r_tok, r_usd = self.rec.charge(
            self.id, attempt_id, tokens, cost, seen)
        self.o.limits.charged(self.id, budgets.Spent(a_tok, a_usd), budgets.Spent(r_tok, r_usd))
        return budgets.exceeded(self.o.cfg.budgets, budgets.Spent(a_tok, a_usd),
                                budgets.Spent(t_tok, t_usd), budgets.Spent(r_tok, r_usd))

    def after_turn(self, t: TaskRow, sbx: Sandbox) -> None:
        """The turn ended well: take the work out, check progress, go to CI."""
        try:
            message = str(t.spec.get("title") or self.id) if self.o.cfg.agents.auto_commit \
                else None
            base = t.base_commit or self.o.main
            head = sandboxes.export_work(self.o.repo, sbx, base, self.o.task_ref(self.id),
                                         self.o.run_dir / "scratch" / f"{self.id}.bundle",
                                         commit_message=message)
        except CorralError as exc:
            self.retry_or_fail(t, f"the agent's work could not be taken out: {exc}")
            return
        prev = t.head_commit
        # written with the transition that ends the turn: re-reading the turn after a
        # restart must not count its head twice
        fps = [*list((t.memo or {}).get("heads", [])), head or ""][-10:]

        def keep(m: dict[str, Any]) -> None:
            m["heads"] = fps

        if head is None:
            if t.head_commit is None:
                self.retry_or_fail(t, "the agent finished without committing any change")
            else:
                self.climb(t, ["the turn ended with no change at all"], memo=keep)
            return
        if head == prev and stuck.no_progress(fps, self.o.cfg.stuck.no_progress_turns):
            self.climb(t, [f"no progress: {self.o.cfg.stuck.no_progress_turns} turn(s) in a "
                           "row left the work unchanged"], memo=keep)
            return
        snap = None
        with contextlib.suppress(CorralError):
            snap = sbx.snapshot().id
        old_snap = t.snapshot_id
        self.rec.transition(self.id, S.CI, expect=S.RUNNING, head_commit=head,
                            snapshot_id=snap or t.snapshot_id, turn_command=None, memo=keep)
        if snap and old_snap:
            with contextlib.suppress(CorralError):
                Sandbox.delete_snapshot(old_snap, home=self.o.home)

    # -- ci ------------------------------------------------------------------
    def ci(self, t: TaskRow) -> None:
        """CI of what would land: the task's commits on top of the merge queue's last
        candidate when there is one (it would join the queue right behind it), else on
        current main; on the task's own head when they apply to neither (the queue
        then raises the conflict). When the task's candidate in the queue turns out
        to be that exact tree, the queue lands it without a second run.

        A failure on top of the queue is checked again on main alone before the agent
        hears of it: the entries ahead may be what broke.
        """
        head = t.head_commit
        assert head is not None
        o = self.o
        bases = [b for b in (o.queue_top(), o.main) if b]
        res = None
        target = head
        for i, base in enumerate(bases):
            speculative = i < len(bases) - 1
            try:
                merged = o.repo.merge(base, head, method=o.cfg.merge.method, task_id=self.id,
                                      title=str(t.spec.get("title") or self.id))
            except CorralError:
                merged = None
            if merged is None or merged.commit is None:
                if speculative:
                    continue
                target = head
            else:
                target = merged.commit
            res = o.run_ci(self.id, target, "speculative" if speculative else "task",
                           t.ci_rounds + 1)
            if res.passed or not speculative:
                break
            self.rec.event("ci_retry", self.id, detail="CI failed on top of the merge queue; "
                           "again on main alone")
        assert res is not None
        if res.passed:
            self.rec.transition(self.id, S.REVIEW, expect=S.CI, stuck_level=0,
                                memo=lambda m: m.update(signatures=[]))
            return
        self.ci_failed(self.rec.task(self.id), res, "task", S.CI, rebased=target != head)

    def ci_failed(self, t: TaskRow, res: Any, stage: str, frm: TaskState,
                  rebased: bool = True) -> None:
        """CI failed (before merging or after the rebase): react, climb or give up.
        ``rebased``: CI ran on the task's commits put on top of the current main."""
        rounds = t.ci_rounds + 1
        sigs = [*list((t.memo or {}).get("signatures", [])), res.signature]
        self.rec.memo(self.id, lambda m: m.update(signatures=sigs[-10:]))
        max_rounds = self.o.cfg.ci.max_rounds
        if rounds >= max_rounds:
            self.rec.transition(self.id, S.NEEDS_HUMAN, expect=frm, ci_rounds=rounds,
                                reason=f"CI failed {rounds} rounds (ci.max_rounds is "
                                       f"{max_rounds})")
            self.o.factory.destroy(t.sandbox_id)
            raise Stop
        if stuck.repeated(sigs, self.o.cfg.stuck.repeated_failures):
            self.rec.transition(self.id, S.CI_FAILED, expect=frm, ci_rounds=rounds)
            self.climb(self.rec.task(self.id), [
                f"the same CI failure {self.o.cfg.stuck.repeated_failures} times in a row "
                f"({', '.join(res.failing_tests[:5]) or res.step})"], frm=S.CI_FAILED)
            return
        payload = {"stage": stage, "round": rounds, "max_rounds": max_rounds,
                   "rebased": rebased, "main_commit": self.o.main,
                   "step": res.step, "exit_code": res.exit_code,
                   "failing_tests": res.failing_tests, "log_tail": res.tail}
        self.rec.transition(self.id, S.CI_FAILED, expect=frm, ci_rounds=rounds,
                            pending={"reaction": "ci_failed", "payload": payload})

    # -- stuck ladder, retries -----------------------------------------------
    def climb(self, t: TaskRow, signals: list[str], frm: TaskState = S.RUNNING,
              memo: Any = None) -> None:
        level = t.stuck_level + 1
        r = stuck.rung(level)
        self.rec.event("stuck", self.id, level=level, rung=r.value, signals=signals)
        if r in (stuck.Rung.NUDGE, stuck.Rung.DIFFERENT_APPROACH):
            failed = self.o.failure_summary(t)
            pending = {"reaction": "stuck", "payload": {
                "level": r.value, "signals": signals, "failed": failed}}
            self.rec.transition(self.id, S.RUNNING, expect=frm, stuck_level=level,
                                pending=pending, turn_command=None, memo=memo)
        elif r is stuck.Rung.FRESH_SESSION:
            self.o.factory.destroy(t.sandbox_id)
            self.rec.transition(self.id, S.READY, expect=frm, stuck_level=level,
                                sandbox_id=None, session_id=None, turn_command=None,
                                pending={"fresh": True}, not_before=self.o.clock.now(),
                                reason="stuck: a fresh session from the last good snapshot",
                                memo=memo)
        else:
            self.o.factory.destroy(t.sandbox_id)
            self.rec.transition(self.id, S.NEEDS_HUMAN, expect=frm, stuck_level=level,
                                reason="stuck: " + "; ".join(signals), memo=memo)
            raise Stop

    def retry_or_fail(self, t: TaskRow, why: str) -> None:
        """The attempt failed: a fresh one after a backoff, or failed when out of them."""
        failures = t.failures + 1

        def note(m: dict[str, Any]) -> None:
            m.setdefault("failures", []).append(why[:500])
            m.pop("launch", None)

        now = self.rec.task(self.id)
        cur, sandbox = S(now.state), now.sandbox_id or t.sandbox_id
        delay = self.o.cfg.agents.retry_backoff * (2 ** (failures - 1))
        try:
            if cur.terminal:
                pass
            elif failures >= self.o.cfg.agents.max_attempts:
                self.rec.transition(self.id, S.FAILED, failures=failures, sandbox_id=None,
                                    reason=f"{why} (after {failures} attempts)", memo=note)
            elif cur is S.PREPARING or S.READY in _next(cur):
                self.rec.transition(self.id, S.READY, failures=failures, sandbox_id=None,
                                    session_id=None, turn_command=None, pending={},
                                    not_before=self.o.clock.now() + delay,
                                    reason=f"{why}; retrying in {delay:.0f}s", memo=note)
            else:
                self.rec.transition(self.id, S.FAILED, failures=failures, reason=why, memo=note)
        finally:
            # after the transition: a crash in between leaves a task that still
            # names its sandbox, never one whose sandbox silently vanished
            self.o.factory.destroy(sandbox)
        raise Stop


class _ExitWaker:
    """Sets ``event`` the moment a turn's process ends (a pidfd), so the watch loop
    sees the end at once rather than at its next poll; a no-op where pidfds are not
    available. Should the process be gone already and its pid reused, it waits on
    the wrong one, harmlessly: the poll has seen the end by then."""

    def __init__(self, pid: int, event: threading.Event) -> None:
        self._event = event
        self._fd: int | None = None
        self._stop_r, self._stop_w = os.pipe()
        try:
            self._fd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            return
        self._thread = threading.Thread(target=self._wait, daemon=True,
                                        name=f"corral-exit-{pid}")
        self._thread.start()

    def _wait(self) -> None:
        assert self._fd is not None
        ready, _, _ = select.select([self._fd, self._stop_r], [], [])
        if self._fd in ready:
            self._event.set()

    @property
    def active(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> _ExitWaker:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.write(self._stop_w, b"x")
            self._thread.join()
            os.close(self._fd)
        os.close(self._stop_r)
        os.close(self._stop_w)


def _next(st: TaskState) -> frozenset[TaskState]:
    from corral.orchestrator.states import TRANSITIONS

    return TRANSITIONS[st]


__all__ = ["CIRunRow", "TaskWorker"]
