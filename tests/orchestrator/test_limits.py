"""The arithmetic of proxy-enforced budgets, over a real store and the real meter:
what is left of the budgets becomes each fenced sandbox's proxy limit, the run's
spending moves the others' limits, and a turn's own spending counts once."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.config import BudgetsConfig
from corral.orchestrator.budgets import Spent, headroom, proxy_meter
from corral.orchestrator.limits import ProxyLimits, TurnGuard
from corral.security.metering import Meter
from corral.security.policy import LlmPolicy
from corral.security.types import Usage
from corral.store import Store, open_store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(f"sqlite:///{tmp_path / 'corral.db'}")


def test_headroom_is_the_least_budget_left_and_names_it() -> None:
    cfg = BudgetsConfig(run_tokens=10_000, task_tokens=3_000, attempt_tokens=2_000,
                        task_usd=1.0)
    h = headroom(cfg, Spent(500), Spent(2_000, 0.25), Spent(9_000))
    assert h.tokens == 1_000 and h.token_budget == "the task's token budget " \
        "(budgets.task_tokens: 3000)"
    assert h.usd == pytest.approx(0.75) and "budgets.task_usd" in (h.usd_budget or "")
    spent = headroom(cfg, Spent(0), Spent(0), Spent(12_000))
    assert spent.tokens == 0 and "run's" in (spent.token_budget or "")  # never negative
    assert headroom(BudgetsConfig(), Spent(), Spent(), Spent()) == type(h)()


def test_run_spending_moves_the_other_turns_limits(store: Store) -> None:
    cfg = BudgetsConfig(run_tokens=1_000, task_tokens=800)
    meter = proxy_meter(store)
    assert meter is not None
    limits = ProxyLimits(meter, lambda: cfg)
    raw = Meter(store)
    raw.record("sb-a", Usage(50, 0, model="m"))  # metered before the turn (a setup call)
    a = limits.begin("a", "sb-a", attempt=Spent(50), task=Spent(50), run=Spent(50))
    b = limits.begin("b", "sb-b", attempt=Spent(), task=Spent(), run=Spent(50))
    assert a is not None and b is not None
    # a: 50 metered + min(800 - 50, 1000 - 50) ; b: min(800, 1000 - 50)
    assert raw.limit("sb-a").tokens == 50 + 750  # type: ignore[union-attr]
    assert raw.limit("sb-b").tokens == 800  # type: ignore[union-attr]
    # a spends 600 (metered, then charged): the run has 350 left for b
    raw.record("sb-a", Usage(600, 0, model="m"))
    limits.charged("a", attempt=Spent(650), run=Spent(650))
    lim_b = raw.limit("sb-b")
    assert lim_b is not None and lim_b.tokens == 350
    assert lim_b.token_label == "the run's token budget (budgets.run_tokens: 1000)"
    # a's own spending does not tighten a's limit twice: it is already metered
    assert raw.limit("sb-a").tokens == 800  # type: ignore[union-attr]
    # b spends 300 of its 350: a's limit now follows the run, b's stays put
    raw.record("sb-b", Usage(300, 0, model="m"))
    limits.charged("b", attempt=Spent(300), run=Spent(950))
    assert raw.limit("sb-b").tokens == 350  # type: ignore[union-attr]
    assert raw.limit("sb-a").tokens == 650 + 50  # type: ignore[union-attr]
    assert raw.check("sb-b", LlmPolicy()) is None
    raw.record("sb-b", Usage(50, 0, model="m"))
    assert "run's token budget" in (raw.check("sb-b", LlmPolicy()) or "")
    # a re-attached turn (its base from the memo) gets the same limit
    limits.end("a")
    again = limits.begin("a", "sb-a", attempt=Spent(650), task=Spent(650), run=Spent(950),
                         base=a.to_memo())
    assert again is not None and again.own == Spent(600)
    assert raw.limit("sb-a").tokens == 700  # type: ignore[union-attr]


def test_no_fence_no_limits(store: Store) -> None:
    limits = ProxyLimits(None, BudgetsConfig)
    assert limits.begin("a", "sb-a", attempt=Spent(), task=Spent(), run=Spent()) is None
    limits.charged("a", Spent(5), Spent(5))  # nothing to do, nothing written
    assert Meter(store).limit("sb-a") is None


def test_guard_charges_from_the_meter_and_settles_the_shortfall(store: Store) -> None:
    cfg = BudgetsConfig(attempt_tokens=1_000)
    meter = proxy_meter(store)
    assert meter is not None
    limits = ProxyLimits(meter, lambda: cfg)
    raw = Meter(store)
    charged: list[Spent] = []
    attempt = [0]  # what the attempt has been charged in all (as Records.charge keeps it)

    def charge(s: Spent) -> str | None:
        charged.append(s)
        attempt[0] += s.tokens
        limits.charged("t", Spent(attempt[0]), Spent(attempt[0]))
        return "over" if attempt[0] > 1_000 else None

    # a harness without usage reports: the meter is the source
    ft = limits.begin("t", "sb-1", attempt=Spent(), task=Spent(), run=Spent())
    assert ft is not None
    guard = TurnGuard(limits, ft, from_meter=True, charge=charge)
    raw.record("sb-1", Usage(400, 0, model="m"))
    assert guard.poll() is None and charged == [Spent(400)]
    assert guard.poll() is None and charged == [Spent(400)]  # taken once
    raw.record("sb-1", Usage(700, 0, model="m"))
    assert guard.poll() == "over"
    # a harness whose reports fell short (stopped before its totals): settled once
    charged.clear()
    attempt[0] = 0
    ft2 = limits.begin("t", "sb-2", attempt=Spent(), task=Spent(), run=Spent())
    assert ft2 is not None
    g2 = TurnGuard(limits, ft2, from_meter=False, charge=charge)
    raw.record("sb-2", Usage(300, 200, model="m"))
    attempt[0] = 300  # the events reported the input side
    limits.charged("t", Spent(300), Spent(300))
    assert g2.settle() is None and charged == [Spent(200)]
    assert g2.settle() is None and charged == [Spent(200)]
    # usage metered before a turn was charged with the turns before it: not again
    charged.clear()
    attempt[0] = 0
    raw.record("sb-3", Usage(250, 0, model="m"))
    ft3 = limits.begin("t", "sb-3", attempt=Spent(), task=Spent(), run=Spent())
    assert ft3 is not None
    g3 = TurnGuard(limits, ft3, from_meter=True, charge=charge)
    raw.record("sb-3", Usage(40, 0, model="m"))
    assert g3.poll() is None and g3.settle() is None and charged == [Spent(40)]
    # a refusal the agent kept quiet about is a reason to stop
    raw.set_limit("sb-2", tokens=500)
    assert raw.check("sb-2", LlmPolicy())
    assert "the proxy refused a model call" in (g2.poll() or "")
