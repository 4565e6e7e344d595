"""Budgets nest run > task > attempt, in tokens and optionally money.

They are checked before a task is dispatched and after every usage report
during a turn; crossing one stops the attempt at once. Usage comes from the
harness's events, or, for a harness that reports none, from what the security
layer's proxy metered on the wire (``proxy_meter``). In a fenced sandbox the
proxy also enforces what is left (``headroom``): it refuses the next model call
once the sandbox has spent it (see ``orchestrator.limits``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from corral.config import BudgetsConfig


@dataclass(frozen=True)
class Spent:
    tokens: int = 0
    usd: float = 0.0

    def __add__(self, other: Spent) -> Spent:
        return Spent(self.tokens + other.tokens, self.usd + other.usd)

    def __sub__(self, other: Spent) -> Spent:
        return Spent(self.tokens - other.tokens, self.usd - other.usd)


class ProxyMeter:
    """The security layer's meter in the orchestrator's terms (``Spent``): what the
    proxy metered per sandbox, and the sandbox's own limits it enforces."""

    def __init__(self, meter: Any) -> None:
        self._m = meter

    def take(self, sandbox_id: str) -> Spent:
        t = self._m.take(sandbox_id)
        return Spent(int(t.tokens), float(t.cost))

    def metered(self, sandbox_id: str) -> Spent:
        """Everything metered for ``sandbox_id`` so far."""
        t = self._m.totals(sandbox_id=sandbox_id)
        return Spent(int(t.tokens), float(t.cost))

    def set_limit(self, sandbox_id: str, tokens: int | None, usd: float | None, *,
                  task_id: str | None = None, token_label: str | None = None,
                  usd_label: str | None = None) -> None:
        self._m.set_limit(sandbox_id, tokens, usd, task_id=task_id, token_label=token_label,
                          usd_label=usd_label)

    def refusals(self, sandbox_id: str) -> tuple[int, str | None]:
        """Model calls the proxy refused ``sandbox_id`` so far, and the last refusal."""
        lim = self._m.limit(sandbox_id)
        return (0, None) if lim is None else (int(lim.refusals), lim.last_refusal)


def proxy_meter(store: Any) -> ProxyMeter | None:
    """The security layer's meter over ``store``, when that layer is installed."""
    import importlib

    try:
        metering = importlib.import_module("corral.security.metering")
    except ImportError:
        return None
    meter = getattr(metering, "orchestrator_meter", None)
    return ProxyMeter(meter(store)) if callable(meter) else None


@dataclass(frozen=True)
class Headroom:
    """What is left before the first budget binds, per unit, and which one binds
    (None: no budget in that unit). Never negative."""

    tokens: int | None = None
    usd: float | None = None
    #: the binding budget, as the agent reads it: "the task's token budget
    #: (budgets.task_tokens: 500)"
    token_budget: str | None = None
    usd_budget: str | None = None


def headroom(cfg: BudgetsConfig, attempt: Spent, task: Spent, run: Spent) -> Headroom:
    """The least of (budget - spent) over the attempt, task and run budgets."""
    tok: tuple[int, str] | None = None
    usd: tuple[float, str] | None = None
    for scope, spent, t_cap, u_cap in (
            ("attempt", attempt, cfg.attempt_tokens, cfg.attempt_usd),
            ("task", task, cfg.task_tokens, cfg.task_usd),
            ("run", run, cfg.run_tokens, cfg.run_usd)):
        if t_cap is not None:
            left = max(t_cap - spent.tokens, 0)
            if tok is None or left < tok[0]:
                tok = (left, f"the {scope}'s token budget (budgets.{scope}_tokens: {t_cap})")
        if u_cap is not None:
            uleft = max(u_cap - spent.usd, 0.0)
            if usd is None or uleft < usd[0]:
                usd = (uleft, f"the {scope}'s money budget (budgets.{scope}_usd: {u_cap})")
    return Headroom(tokens=tok[0] if tok else None, usd=usd[0] if usd else None,
                    token_budget=tok[1] if tok else None, usd_budget=usd[1] if usd else None)


def exceeded(cfg: BudgetsConfig, attempt: Spent, task: Spent, run: Spent) -> str | None:
    """The first budget crossed, as a sentence, or None."""
    checks = (
        ("run", run, cfg.run_tokens, cfg.run_usd),
        ("task", task, cfg.task_tokens, cfg.task_usd),
        ("attempt", attempt, cfg.attempt_tokens, cfg.attempt_usd),
    )
    for scope, spent, tokens, usd in checks:
        if tokens is not None and spent.tokens > tokens:
            return f"{scope} budget exceeded: {spent.tokens} tokens of {tokens}"
        if usd is not None and spent.usd > usd:
            return f"{scope} budget exceeded: ${spent.usd:.2f} of ${usd:.2f}"
    return None


def dispatch_blocked(cfg: BudgetsConfig, task: Spent, run: Spent) -> tuple[str, str] | None:
    """Why a task may not start: ("run" | "task", sentence), or None."""
    if cfg.run_tokens is not None and run.tokens >= cfg.run_tokens:
        return "run", f"run budget spent: {run.tokens} tokens of {cfg.run_tokens}"
    if cfg.run_usd is not None and run.usd >= cfg.run_usd:
        return "run", f"run budget spent: ${run.usd:.2f} of ${cfg.run_usd:.2f}"
    if cfg.task_tokens is not None and task.tokens >= cfg.task_tokens:
        return "task", f"task budget spent: {task.tokens} tokens of {cfg.task_tokens}"
    if cfg.task_usd is not None and task.usd >= cfg.task_usd:
        return "task", f"task budget spent: ${task.usd:.2f} of ${cfg.task_usd:.2f}"
    return None
