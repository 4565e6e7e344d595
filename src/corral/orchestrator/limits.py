"""Budgets the proxy enforces: a fenced sandbox may spend what is left of them.

When a turn starts in a fenced sandbox, its proxy limit becomes what the proxy
metered for it so far plus the headroom of the attempt, task and run budgets
(``budgets.headroom``); the proxy refuses the next model call once the sandbox
reaches it, with a message naming the budget. While the turn runs, other tasks
spending the run budget shrink that headroom: ``ProxyLimits.charged`` works out
the other live turns' limits again and writes those that changed (only the run
term moves, and only when a run budget is set: a small write per usage report
at most, never one per poll).

Per turn: at its start the sandbox had metered M0, the attempt had spent A0
and the task T0; the turn's own spending since is the attempt's growth A - A0.
The limit is ``M0 + min(attempt_cap - A0, task_cap - T0, run_cap - (R - (A -
A0)))``: the turn's own spending counts once, through the proxy's meter,
however late its usage reports reach the orchestrator. The base (M0, A0, T0)
is kept in the task's memo, so a restarted orchestrator re-attaching to the
turn computes the same limit.

``TurnGuard`` watches one fenced turn: it charges what the proxy metered when
the harness reports no usage of its own (the ``command`` harness: the meter's
``take``, every ``POLL_EVERY`` seconds), notices a refusal (the agent may carry
on, or exit 0, as if nothing happened), and at the end of the turn charges
whatever the proxy metered for the turn that was not charged yet (a CLI stopped
before it printed its totals). Charges and the turn's base are in the store,
so that last sum holds across a restart too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from corral.config import BudgetsConfig
from corral.orchestrator.budgets import ProxyMeter, Spent, headroom

#: seconds between two looks at the meter during a turn (the proxy refuses calls
#: by itself; this only bounds how long a refused agent may keep the sandbox)
POLL_EVERY = 0.5


def _spent(v: Any) -> Spent:
    return Spent(int(v[0]), float(v[1]))


@dataclass
class FencedTurn:
    """One turn in a fenced sandbox, as far as its limit is concerned."""

    task_id: str
    sandbox_id: str
    #: at the turn's start: metered for the sandbox, spent by the attempt and the task
    base_metered: Spent
    base_attempt: Spent
    base_task: Spent
    #: calls the proxy had refused the sandbox before the turn
    base_refusals: int
    #: the attempt's spending now (moves with the turn's own charges)
    attempt: Spent
    #: the limits last written (tokens, usd)
    written: tuple[int | None, float | None] | None = None

    @property
    def own(self) -> Spent:
        """What the turn itself has been charged so far."""
        return self.attempt - self.base_attempt

    def to_memo(self) -> dict[str, Any]:
        return {"sandbox": self.sandbox_id, "refusals": self.base_refusals,
                "metered": [self.base_metered.tokens, self.base_metered.usd],
                "attempt": [self.base_attempt.tokens, self.base_attempt.usd],
                "task": [self.base_task.tokens, self.base_task.usd]}

    @classmethod
    def from_memo(cls, task_id: str, memo: dict[str, Any], attempt: Spent) -> FencedTurn:
        return cls(task_id=task_id, sandbox_id=str(memo["sandbox"]),
                   base_metered=_spent(memo["metered"]), base_attempt=_spent(memo["attempt"]),
                   base_task=_spent(memo["task"]), base_refusals=int(memo["refusals"]),
                   attempt=attempt)


class ProxyLimits:
    """The proxy limits of a run's live fenced turns. Thread safe.

    ``meter`` is None when sandboxes are not fenced (or the security layer is
    missing): then every method is a no-op and ``begin`` returns None."""

    def __init__(self, meter: ProxyMeter | None,
                 budgets: Callable[[], BudgetsConfig]) -> None:
        self.meter = meter
        self._budgets = budgets
        self._turns: dict[str, FencedTurn] = {}
        self._run = Spent()
        self._lock = threading.Lock()

    def begin(self, task_id: str, sandbox_id: str, *, attempt: Spent, task: Spent,
              run: Spent, base: dict[str, Any] | None = None) -> FencedTurn | None:
        """A turn starts (or is re-attached to: ``base`` is its memo) in a fenced
        sandbox: set its limit before the agent may call a model."""
        if self.meter is None:
            return None
        if base and base.get("sandbox") == sandbox_id:
            ft = FencedTurn.from_memo(task_id, base, attempt)
        else:
            refusals, _ = self.meter.refusals(sandbox_id)
            metered = self.meter.metered(sandbox_id)
            # what was metered before the turn was charged with the turns before it:
            # the meter's ``take`` starts from here (anything it then misses, the
            # turn's ``settle`` finds against ``metered``)
            self.meter.take(sandbox_id)
            ft = FencedTurn(task_id=task_id, sandbox_id=sandbox_id, base_metered=metered,
                            base_attempt=attempt, base_task=task, base_refusals=refusals,
                            attempt=attempt)
        with self._lock:
            self._turns[task_id] = ft
            self._run = _latest(self._run, run)
            self._write(ft)
        return ft

    def end(self, task_id: str) -> None:
        with self._lock:
            self._turns.pop(task_id, None)

    def charged(self, task_id: str, attempt: Spent, run: Spent) -> None:
        """A task was charged (its attempt and the run now stand at these): the
        other live turns' share of the run budget shrank."""
        if self.meter is None:
            return
        with self._lock:
            ft = self._turns.get(task_id)
            if ft is not None:
                ft.attempt = attempt
            self._run = _latest(self._run, run)
            cfg = self._budgets()
            if cfg.run_tokens is None and cfg.run_usd is None:
                return
            for other in self._turns.values():
                if other.task_id != task_id:
                    self._write(other)

    def refresh(self) -> None:
        """The budgets changed (a config reload): write every live turn's limit again."""
        with self._lock:
            for ft in self._turns.values():
                self._write(ft)

    def _write(self, ft: FencedTurn) -> None:  # under _lock
        assert self.meter is not None
        h = headroom(self._budgets(), ft.base_attempt, ft.base_task, self._run - ft.own)
        tokens = None if h.tokens is None else ft.base_metered.tokens + h.tokens
        usd = None if h.usd is None else round(ft.base_metered.usd + h.usd, 9)
        if ft.written == (tokens, usd):
            return
        self.meter.set_limit(ft.sandbox_id, tokens, usd, task_id=ft.task_id,
                             token_label=h.token_budget, usd_label=h.usd_budget)
        ft.written = (tokens, usd)


def _latest(a: Spent, b: Spent) -> Spent:
    """Run totals only grow: the larger of two readings, whichever came last."""
    return Spent(max(a.tokens, b.tokens), max(a.usd, b.usd))


class TurnGuard:
    """The budget watch of one fenced turn (see the module docstring).

    ``charge(spent)`` charges the task and returns why the attempt must stop
    (a budget crossed) or None; ``from_meter``: the harness reports no usage,
    so the proxy's meter is the turn's only source."""

    def __init__(self, limits: ProxyLimits, turn: FencedTurn, *, from_meter: bool,
                 charge: Callable[[Spent], str | None]) -> None:
        assert limits.meter is not None
        self.meter = limits.meter
        self.turn = turn
        self.from_meter = from_meter
        self._charge = charge
        self._next = 0.0
        #: ``settle`` has run
        self.settled = False

    def due(self) -> bool:
        """True at most every ``POLL_EVERY`` seconds."""
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + POLL_EVERY
        return True

    def poll(self) -> str | None:
        """Charge what the meter took (``from_meter``); why the attempt must stop
        (a budget crossed, a model call refused by the proxy), or None."""
        return self._take() or self._refused()

    def settle(self) -> str | None:
        """The turn ended: charge what the proxy metered for it that was not charged
        yet (a CLI stopped before it printed its totals; a record the meter handed
        out late), then say, as ``poll``, why the attempt must stop, if it must."""
        self.settled = True
        why = self._take()
        metered = self.meter.metered(self.turn.sandbox_id) - self.turn.base_metered
        own = self.turn.own
        short = Spent(max(metered.tokens - own.tokens, 0), max(metered.usd - own.usd, 0.0))
        if short.tokens > 0 or short.usd > 1e-9:
            why = self._charge(short) or why
        return why or self._refused()

    def _take(self) -> str | None:
        if not self.from_meter:
            return None
        got = self.meter.take(self.turn.sandbox_id)
        return self._charge(got) if got.tokens or got.usd else None

    def _refused(self) -> str | None:
        refusals, last = self.meter.refusals(self.turn.sandbox_id)
        if refusals > self.turn.base_refusals:
            return f"the proxy refused a model call: {last or 'a limit was reached'}"
        return None
