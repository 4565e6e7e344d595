"""A task's life with real sandboxes, real git and the scripted agent."""

from __future__ import annotations

from tests.orchestrator.conftest import (
    Project,
    events,
    finish,
    live_sandboxes,
    run_in_thread,
    task_state,
    wait_for,
    write_step,
)


def commit(msg: str) -> dict:
    return {"commit": msg}


def test_dependency_gating_and_ci_fail_then_fix(project: Project) -> None:
    bad = "import unittest\n\n\nclass B(unittest.TestCase):\n    def test_b(self):\n" \
          "        self.assertEqual(open('b.txt').read(), 'fixed\\n')\n"
    project.write_plan([
        {"id": "a", "title": "Add a", "script": {"start": [
            write_step("a.txt", "a\n"), {"usage": 100}, commit("Add a")]}},
        {"id": "b", "title": "Add b", "depends_on": ["a"], "script": {
            "start": [{"run": "test -f a.txt"}, write_step("b.txt", "broken\n"),
                      write_step("tests/test_b.py", bad), commit("Add b")],
            "ci_failed": [write_step("b.txt", "fixed\n"), commit("Fix b")]}},
    ])
    orch = project.orchestrator()
    st = finish(orch)
    assert st["state"] == "finished", st
    a, b = task_state(st, "a"), task_state(st, "b")
    assert a["state"] == b["state"] == "merged"
    assert b["ci_failures"] == 1 and b["ci_rounds"] == 1
    # b started only after a merged, from main with a on it
    evs = events(orch)
    merged_a = next(e for e in evs if e.task_id == "a" and e.to_state == "merged")
    prep_b = next(e for e in evs if e.task_id == "b" and e.to_state == "preparing")
    assert prep_b.id > merged_a.id
    reactions = [e.data["reaction"] for e in evs if e.task_id == "b" and e.kind == "reaction"]
    assert reactions == ["start", "ci_failed"]
    prompt = next(e.data["prompt"] for e in evs if e.kind == "reaction"
                  and e.data["reaction"] == "ci_failed")
    assert "tests.test_b.B.test_b" in prompt and "round 1" in prompt
    assert project.show("b.txt") == "fixed\n"
    assert project.main_log()[:3] == ["Fix b", "Add b", "Add a"]
    assert live_sandboxes(orch.run_id) == []


def test_conflict_then_resolve(project: Project) -> None:
    def edit(line: str, delay: float) -> dict:
        return {"start": [{"sleep": delay}, {"append": {"path": "app.txt", "content": line}},
                          commit(f"Append {line.strip()}")],
                "conflict": [{"run": "git reset -q --hard origin/main"},
                             {"append": {"path": "app.txt", "content": line}},
                             commit(f"Append {line.strip()} again")]}

    project.write_plan([
        {"id": "x", "title": "X", "script": edit("four\n", 0.0)},
        {"id": "y", "title": "Y", "script": edit("five\n", 0.8)},
    ])
    orch = project.orchestrator()
    st = finish(orch)
    assert st["state"] == "finished", st
    assert task_state(st, "y")["conflicts"] == 1
    conflict = next(e for e in events(orch, "y") if e.kind == "reaction"
                    and e.data["reaction"] == "conflict")
    assert "app.txt" in conflict.data["prompt"] and "<<<<<<<" in conflict.data["prompt"]
    assert project.show("app.txt") == "one\ntwo\nthree\nfour\nfive\n"


def test_human_review_reject_then_approve(project: Project, corral_cli) -> None:
    project.write_plan([{"id": "r", "title": "Reviewed", "script": {
        "start": [write_step("r.txt", "v1\n"), commit("r v1")],
        "changes_requested": [write_step("r.txt", "v2\n"), commit("r v2")]}}],
        review={"mode": "human"})
    orch = project.orchestrator()
    th, out = run_in_thread(orch)
    wait_for(lambda: task_state(orch.status(), "r")["state"] == "review", what="review")
    r = corral_cli("review", "reject", "r", "--run", orch.run_id, "--reason", "say v2")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: any(e.kind == "reaction" and e.data["reaction"] == "changes_requested"
                         for e in events(orch, "r")), what="changes_requested")
    wait_for(lambda: task_state(orch.status(), "r")["state"] == "review", what="review again")
    prompt = next(e.data["prompt"] for e in events(orch, "r") if e.kind == "reaction"
                  and e.data["reaction"] == "changes_requested")
    assert "say v2" in prompt
    r = corral_cli("review", "approve", "r", "--run", orch.run_id)
    assert r.returncode == 0, r.stderr
    th.join(60)
    assert out["status"]["state"] == "finished"
    assert project.show("r.txt") == "v2\n"
    bad = corral_cli("review", "approve", "r", "--run", orch.run_id)
    assert bad.returncode == 2 and "not waiting for review" in bad.stderr


def test_budget_exceeded_mid_attempt_stops_at_once(project: Project) -> None:
    project.write_plan(
        [{"id": "spender", "title": "Spend", "script": {"start": [
            {"usage": 400}, {"sleep": 0.1}, {"usage": 800}, {"hang": True}]}},
         {"id": "after", "title": "After", "depends_on": ["spender"],
          "script": {"start": [write_step("z", "z"), commit("z")]}}],
        budgets={"attempt_tokens": 1000})
    orch = project.orchestrator()
    st = finish(orch, timeout=30)
    t = task_state(st, "spender")
    assert t["state"] == "budget_exceeded"
    assert t["tokens"] == 1200
    assert "attempt budget exceeded" in t["reason"]
    assert task_state(st, "after")["state"] == "queued"  # never started: blocked for good
    assert st["state"] == "incomplete"
    assert live_sandboxes(orch.run_id) == []


def test_run_budget_stops_dispatching(project: Project) -> None:
    project.write_plan(
        [{"id": "first", "title": "F", "script": {"start": [
            {"usage": 500}, write_step("f", "f"), commit("f")]}},
         {"id": "second", "title": "S", "depends_on": ["first"],
          "script": {"start": [write_step("s", "s"), commit("s")]}}],
        budgets={"run_tokens": 400})
    orch = project.orchestrator()
    st = finish(orch, timeout=30)
    assert task_state(st, "first")["state"] == "budget_exceeded"
    assert task_state(st, "second")["state"] in ("queued", "budget_exceeded")
    assert "second" not in {e.task_id for e in events(orch) if e.to_state == "preparing"}


def test_retries_are_bounded(project: Project) -> None:
    project.write_plan([{"id": "flaky", "title": "Never works",
                         "script": {"start": [{"say": "nope"}, {"exit": 3}]}}],
                       agents={"harness": "scripted", "max_attempts": 3,
                               "retry_backoff": "0.05s"})
    orch = project.orchestrator()
    st = finish(orch, timeout=60)
    t = task_state(st, "flaky")
    assert t["state"] == "failed" and t["attempts"] == 3
    assert "exited with code 3" in t["reason"]
    retry = [e for e in events(orch, "flaky") if e.kind == "reaction"]
    assert [e.data["reaction"] for e in retry] == ["start", "retry", "retry"]
    assert "attempt 1: " in retry[-1].data["prompt"]


def test_cancel_task_from_cli(project: Project, corral_cli) -> None:
    project.write_plan([{"id": "long", "title": "Long", "script": {"start": [{"hang": True}]}}])
    orch = project.orchestrator()
    th, out = run_in_thread(orch)
    wait_for(lambda: task_state(orch.status(), "long")["state"] == "running", what="running")
    r = corral_cli("cancel", "long", "--run", orch.run_id)
    assert r.returncode == 0, r.stderr
    th.join(30)
    assert task_state(out["status"], "long")["state"] == "cancelled"
    assert live_sandboxes(orch.run_id) == []


def test_status_json_from_cli(project: Project, corral_cli) -> None:
    project.write_plan([{"id": "one", "title": "One", "script": {
        "start": [write_step("1", "1"), commit("one")]}}])
    orch = project.orchestrator()
    finish(orch)
    r = corral_cli("status", orch.run_id, "--json")
    assert r.returncode == 0, r.stderr
    import json

    data = json.loads(r.stdout)
    assert data["tasks"][0]["state"] == "merged"
    assert len(data["tasks"][0]["merged_commit"]) == 40
    logs = corral_cli("logs", "one", "--run", orch.run_id, "--json")
    kinds = [json.loads(x)["kind"] for x in logs.stdout.splitlines()]
    assert "file_edit" in kinds and kinds[-1] == "finished"
    missing = corral_cli("status", "run-nope", "--json")
    assert missing.returncode == 2 and "no run" in missing.stderr


def test_bad_plan_from_cli_is_one_line(project: Project, corral_cli) -> None:
    project.plan_file.write_text("tasks:\n  - {id: a, title: A, depends_on: [b]}\n")
    r = corral_cli("run", str(project.plan_file), "--repo", str(project.repo), "--json")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "unknown task 'b'" in r.stderr
