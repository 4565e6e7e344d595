"""Budgets nest run > task > attempt, in tokens and optionally money.

They are checked before a task is dispatched and after every usage report
during a turn; crossing one stops the attempt at once. Usage comes from the
harness's events; a meter (the security layer's proxy, once present) can add
what it measured on the wire for harnesses that report nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from corral.config import BudgetsConfig


@dataclass(frozen=True)
class Spent:
    tokens: int = 0
    usd: float = 0.0


class Meter(Protocol):
    """Usage measured outside the harness (the proxy's LLM meter)."""

    def take(self, sandbox_id: str) -> Spent:
        """Usage of ``sandbox_id`` since the last call."""
        ...


def proxy_meter() -> Meter | None:
    """The security layer's meter, when that layer is installed."""
    import importlib

    try:
        metering = importlib.import_module("corral.security.metering")
    except ImportError:
        return None
    meter = getattr(metering, "orchestrator_meter", None)
    return meter() if callable(meter) else None


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
