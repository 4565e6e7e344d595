"""Store access for the orchestrator: every state change is a row and an event.

``transition`` checks the state table, updates the task and writes the event in
one transaction, so the event log and the task rows never disagree.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update

from corral.compute.context import Context
from corral.orchestrator import states
from corral.orchestrator.states import TaskState
from corral.store.orchestrator_models import (
    AttemptRow,
    InboxRow,
    OutboxRow,
    RunRow,
    TaskEventRow,
    TaskRow,
)

#: SQLite cannot upgrade a read transaction to a write one under contention, so one
#: process's read-modify-write transactions take turns
_WRITE = threading.RLock()


class Records:
    """The store, seen from one run. Thread safe."""

    def __init__(self, ctx: Context, run_id: str, clock_now: Callable[[], float]) -> None:
        self.ctx = ctx
        self.run_id = run_id
        self._now = clock_now

    # -- reading -------------------------------------------------------------
    def run(self) -> RunRow:
        with self.ctx.store.session() as s:
            row = s.get(RunRow, self.run_id)
        assert row is not None
        return row

    def task(self, task_id: str) -> TaskRow:
        with self.ctx.store.session() as s:
            row = s.get(TaskRow, (self.run_id, task_id))
        assert row is not None
        return row

    def tasks(self, states: tuple[TaskState, ...] = ()) -> list[TaskRow]:
        """The run's tasks (those in ``states``, if given), in plan order."""
        q = select(TaskRow).where(TaskRow.run_id == self.run_id)
        if states:
            q = q.where(TaskRow.state.in_([st.value for st in states]))
        with self.ctx.store.session() as s:
            return list(s.scalars(q.order_by(TaskRow.position)))

    # -- writing -------------------------------------------------------------
    def _tx(self) -> Any:
        return _Locked(self.ctx)

    def event(self, kind: str, task_id: str | None = None, **data: Any) -> None:
        with self._tx() as s:
            s.add(self.event_row(kind, task_id, **data))

    def event_row(self, kind: str, task_id: str | None = None, **data: Any) -> TaskEventRow:
        """An event row to add in a caller's transaction."""
        return TaskEventRow(run_id=self.run_id, task_id=task_id, kind=kind, at=time.time(),
                            clock=self._now(), data=data)

    def transition(self, task_id: str, new: TaskState, *, expect: TaskState | None = None,
                   reason: str | None = None, memo: Callable[[dict[str, Any]], None] | None = None,
                   also: Callable[[Any], None] | None = None, **fields: Any) -> TaskRow:
        """Move a task to ``new`` (checked against the table), set ``fields``, and log it.

        With ``expect``, raises ``InvalidTransition`` if the task is not in that
        state any more (someone else moved it, e.g. a cancel). ``memo`` changes the
        task's memo and ``also(session)`` writes other rows, in the same transaction.
        """
        with self._tx() as s:
            row = self.move(s, task_id, new, expect=expect, reason=reason, memo=memo, **fields)
            if also is not None:
                also(s)
            s.flush()
            s.expunge(row)
        out: TaskRow = row
        return out

    def move(self, s: Any, task_id: str, new: TaskState, *, expect: TaskState | None = None,
             reason: str | None = None, memo: Callable[[dict[str, Any]], None] | None = None,
             **fields: Any) -> TaskRow:
        """``transition`` inside the caller's transaction ``s`` (several tasks at once)."""
        row = s.get(TaskRow, (self.run_id, task_id), with_for_update=True)
        assert row is not None
        old = TaskState(row.state)
        if expect is not None and old is not expect:
            raise states.InvalidTransition(
                f"task {task_id}: expected {expect.value}, found {old.value}", state=old.value)
        states.check(task_id, old, new)
        row.state = new.value
        if reason is not None:
            row.reason = reason
        for k, v in fields.items():
            setattr(row, k, v)
        if memo is not None:
            m = copy.deepcopy(row.memo or {})
            memo(m)
            row.memo = m
        data: dict[str, Any] = {}
        if reason:
            data["reason"] = reason
        s.add(TaskEventRow(run_id=self.run_id, task_id=task_id, kind="transition",
                           from_state=old.value, to_state=new.value, at=time.time(),
                           clock=self._now(), data=data))
        out: TaskRow = row
        return out

    def update_task(self, task_id: str, *, memo: Callable[[dict[str, Any]], None] | None = None,
                    **fields: Any) -> None:
        """Set ``fields`` (and change the memo with ``memo``) in one transaction."""
        with self._tx() as s:
            if memo is None:
                s.execute(update(TaskRow).where(TaskRow.run_id == self.run_id,
                                                TaskRow.id == task_id).values(**fields))
                return
            row = s.get(TaskRow, (self.run_id, task_id), with_for_update=True)
            assert row is not None
            for k, v in fields.items():
                setattr(row, k, v)
            m = copy.deepcopy(row.memo or {})
            memo(m)
            row.memo = m

    def memo(self, task_id: str, fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Change a task's memo (a JSON dict) in one transaction; returns the new memo.

        ``fn`` works on a deep copy: a change made in place to a nested list would
        otherwise compare equal to the loaded value and never be written.
        """
        with self._tx() as s:
            row = s.get(TaskRow, (self.run_id, task_id), with_for_update=True)
            assert row is not None
            memo = copy.deepcopy(row.memo or {})
            fn(memo)
            row.memo = memo
        return memo

    def update_run(self, **fields: Any) -> None:
        with self._tx() as s:
            s.execute(update(RunRow).where(RunRow.id == self.run_id).values(**fields))

    def charge(self, task_id: str, attempt_id: int, tokens: int, cost: float, seen: int
               ) -> tuple[int, float, int, float, int, float]:
        """Add one usage report to the attempt, the task and the run, and remember it
        was the turn's ``seen``-th (a re-attached turn skips those), all in one
        transaction so a crash never counts a report twice or loses it.

        Returns the (tokens, cost) of the attempt, the task and the run afterwards.
        """
        with self._tx() as s:
            t = s.get(TaskRow, (self.run_id, task_id), with_for_update=True)
            r = s.get(RunRow, self.run_id, with_for_update=True)
            a = s.get(AttemptRow, attempt_id, with_for_update=True)
            assert t is not None and r is not None
            t.tokens += tokens
            t.cost_usd += cost
            r.tokens += tokens
            r.cost_usd += cost
            a_tokens, a_cost = tokens, cost
            if a is not None:
                a.tokens += tokens
                a.cost_usd += cost
                a_tokens, a_cost = a.tokens, a.cost_usd
            t.memo = {**(t.memo or {}), "turn_usage_seen": seen}
            return a_tokens, a_cost, t.tokens, t.cost_usd, r.tokens, r.cost_usd

    # -- inbox and outbox ----------------------------------------------------
    def inbox(self) -> list[InboxRow]:
        with self.ctx.store.session() as s:
            return list(s.scalars(select(InboxRow).where(
                InboxRow.run_id == self.run_id, InboxRow.handled_at.is_(None))
                .order_by(InboxRow.id)))

    def handled(self, item_id: int) -> None:
        with self._tx() as s:
            s.execute(update(InboxRow).where(InboxRow.id == item_id).values(
                handled_at=time.time()))

    def outbox_pending(self) -> list[OutboxRow]:
        with self.ctx.store.session() as s:
            return list(s.scalars(select(OutboxRow).where(
                OutboxRow.run_id == self.run_id, OutboxRow.state == "pending")
                .order_by(OutboxRow.id)))


def post_inbox(ctx: Context, run_id: str, kind: str, task_id: str | None = None,
               **payload: Any) -> None:
    """Leave a request (approve, reject, cancel) for the run's orchestrator."""
    with ctx.store.session() as s:
        s.add(InboxRow(run_id=run_id, task_id=task_id, kind=kind, payload=payload,
                       created_at=time.time()))


class _Locked:
    """A store transaction held under the process's write lock."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx
        self._cm: Any = None

    def __enter__(self) -> Any:
        _WRITE.acquire()
        try:
            self._cm = self._ctx.store.session()
            return self._cm.__enter__()
        except BaseException:
            _WRITE.release()
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            self._cm.__exit__(*exc)
        finally:
            _WRITE.release()
