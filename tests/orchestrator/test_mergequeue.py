"""The merge queue: speculative CI of the entries behind the head, landing strictly
in order, and the entries behind a failing one tested again without it."""

from __future__ import annotations

from typing import Any

from tests.orchestrator.conftest import (
    Project,
    events,
    live_sandboxes,
    run_in_thread,
    task_state,
    wait_for,
    write_step,
)

from corral.orchestrator.engine import Orchestrator
from corral.orchestrator.records import post_inbox
from corral.store.orchestrator_models import InboxRow

#: a test that a and b break together (each passes on its own)
PAIR = ("import os\nimport unittest\n\n\nclass P(unittest.TestCase):\n"
        "    def test_not_both(self):\n"
        "        self.assertFalse(os.path.exists('a.txt') and os.path.exists('b.txt'))\n")


def approve_together(orch: Orchestrator, *tasks: str) -> None:
    """Approvals in one transaction: the orchestrator reads them together."""
    import time

    with orch.ctx.store.session() as s:
        for t in tasks:
            s.add(InboxRow(run_id=orch.run_id, task_id=t, kind="approve", payload={},
                           created_at=time.time()))
    orch.wake.set()


def task(tid: str, steps: list[dict[str, Any]], **more: Any) -> dict[str, Any]:
    return {"id": tid, "title": f"Add {tid}", "script": {"start": steps}, **more}


def test_queue_tests_ahead_in_parallel_and_retests_behind_a_failure(project: Project) -> None:
    project.write_plan([
        task("a", [write_step("a.txt", "a\n"), write_step("tests/test_pair.py", PAIR),
                   {"commit": "Add a"}]),
        task("b", [write_step("b.txt", "b\n"), {"commit": "Add b"}],
             script={"start": [write_step("b.txt", "b\n"), {"commit": "Add b"}],
                     "ci_failed": [{"run": "git rm -q b.txt"},
                                   write_step("b2.txt", "b\n"), {"commit": "Fix b"}]}),
        task("c", [write_step("c.txt", "c\n"), {"commit": "Add c"}]),
    ], review={"mode": "human"})
    orch = project.orchestrator()
    th, out = run_in_thread(orch)

    def states() -> dict[str, str]:
        return {t["id"]: t["state"] for t in orch.status()["tasks"]}

    wait_for(lambda: set(states().values()) == {"review"}, what="all three in review")
    approve_together(orch, "a", "b", "c")  # one train of three candidates
    wait_for(lambda: any(e.kind == "reaction" and e.data["reaction"] == "ci_failed"
                         for e in events(orch, "b")), timeout=60, what="b's CI failure")
    wait_for(lambda: states()["b"] == "review", timeout=60, what="b fixed, in review again")
    post_inbox(orch.ctx, orch.run_id, "approve", "b")
    orch.wake.set()
    th.join(60)
    st = out["status"]
    assert st["state"] == "finished", st
    # b broke CI only on top of a: it alone got the reaction, after landing's order
    assert project.main_log() == ["Fix b", "Add b", "Add c", "Add a", "init"]
    assert task_state(st, "b")["ci_failures"] == 1
    assert task_state(st, "a")["ci_failures"] == task_state(st, "c")["ci_failures"] == 0
    failed = [e.data for e in events(orch, "b") if e.kind == "reaction"
              and e.data["reaction"] == "ci_failed"]
    assert len(failed) == 1 and "test_not_both" in failed[0]["prompt"]
    # c was tested behind b (speculatively, and failed with it), then again without it
    c_ci = [e.data for e in events(orch, "c") if e.kind == "ci_finished"]
    assert [d["stage"] for d in c_ci][-2:] == ["speculative", "merge"]
    assert [d["passed"] for d in c_ci][-2:] == [False, True]
    # landing strictly in order: a, then c; b only once fixed and approved again
    merged = [e.task_id for e in events(orch) if e.kind == "merged"]
    assert merged == ["a", "c", "b"]
    assert live_sandboxes(orch.run_id) == []


def test_entries_behind_the_head_are_tested_at_once(project: Project) -> None:
    project.write_plan([task(t, [write_step(f"{t}.txt", t), {"commit": f"Add {t}"}])
                        for t in ("p", "q", "r")], review={"mode": "human"})
    orch = project.orchestrator()
    th, out = run_in_thread(orch)
    wait_for(lambda: {t["state"] for t in orch.status()["tasks"]} == {"review"},
             what="all in review")
    approve_together(orch, "p", "q", "r")
    th.join(60)
    assert out["status"]["state"] == "finished", out["status"]
    assert project.main_log() == ["Add r", "Add q", "Add p", "init"]
    evs = events(orch)
    # p's candidate is the tree its own CI passed: it lands without a second run;
    # q (on p) and r (on p and q) are tested together, not one after the other
    merge_ci = [e for e in evs if e.kind.startswith("ci_") and e.data["stage"] != "task"]
    assert {e.task_id for e in merge_ci} == {"q", "r"}
    kinds = [e.kind for e in merge_ci]
    assert kinds[:2] == ["ci_started", "ci_started"], [(e.task_id, e.kind) for e in merge_ci]
    assert [e.task_id for e in evs if e.kind == "merged"] == ["p", "q", "r"]
    from sqlalchemy import select

    from corral.store.orchestrator_models import OutboxRow

    with orch.ctx.store.session() as s:
        pushes = list(s.scalars(select(OutboxRow).where(OutboxRow.run_id == orch.run_id)))
    assert pushes and all(p.state == "done" for p in pushes)
    assert sum(len(p.payload["tasks"]) for p in pushes) == 3
