"""Crashes at exact moments, then a resume: nothing lost, nothing done twice,
nothing left hanging. The first ``corral run`` kills itself with SIGKILL at a
named point (``CORRAL_FAILPOINT``); the resume runs in this process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from tests.orchestrator.conftest import (
    Project,
    events,
    finish,
    live_sandboxes,
    task_state,
    write_step,
)

from corral.compute import Sandbox
from corral.compute.context import get_context
from corral.compute.provider import get_provider
from corral.orchestrator.engine import Orchestrator
from corral.store.orchestrator_models import RunRow, TaskRow

CORRAL = str(Path(sys.executable).parent / "corral")


def crash_at(project: Project, point: str) -> str:
    """Run the plan in a ``corral run`` that kill -9s itself at ``point``; the run id."""
    args = [CORRAL, "run", str(project.plan_file), "--repo", str(project.repo),
            "--origin", str(project.origin), "--json"]
    r = subprocess.run(args, env={**os.environ, "CORRAL_FAILPOINT": point},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    with get_context().store.session() as s:
        row = s.scalars(select(RunRow).where(RunRow.repo == str(project.repo.resolve()))).one()
    return row.id


def task_row(run_id: str, task_id: str) -> TaskRow:
    with get_context().store.session() as s:
        row = s.get(TaskRow, (run_id, task_id))
    assert row is not None
    return row


def reactions(orch: Orchestrator, task: str) -> list[tuple[str, int]]:
    return [(e.data["reaction"], e.data["occurrence"]) for e in events(orch, task)
            if e.kind == "reaction"]


def one_task(project: Project, steps: list[dict[str, Any]]) -> None:
    project.write_plan([{"id": "a", "title": "Add a", "script": {"start": steps}}])


def test_a_snapshot_cut_short_by_a_crash_does_not_hang_the_resume(project: Project) -> None:
    one_task(project, [write_step("a.txt", "a\n"), {"commit": "Add a"}])
    run_id = crash_at(project, "turn_finished")
    t = task_row(run_id, "a")
    assert t.state == "running" and t.sandbox_id and t.turn_command
    # what kill -9 inside Sandbox.snapshot leaves: the store says running, the cgroup
    # is frozen (every exec joining it would block before its exec, for ever)
    sbx = Sandbox.connect(t.sandbox_id)
    row = sbx._row()
    prov = get_provider(row.provider, get_context().settings)
    prov.pause(row)
    assert prov.is_frozen(row)
    orch = Orchestrator.resume(run_id)
    st = finish(orch, timeout=60)
    assert st["state"] == "finished", st
    a = task_state(st, "a")
    assert a["merged_commit"] and a["attempts"] == 1, a
    # the turn that had finished was read again, not run again
    assert reactions(orch, "a") == [("start", 1)]
    assert project.main_log() == ["Add a", "init"]
    assert live_sandboxes(run_id) == []


@pytest.mark.parametrize("point", ["turn_launching", "turn_launched", "turn_recorded"])
def test_a_launch_cut_short_by_a_crash_sends_the_reaction_once(project: Project,
                                                                point: str) -> None:
    one_task(project, [write_step("a.txt", "a\n"), {"commit": "Add a"}])
    run_id = crash_at(project, point)
    t = task_row(run_id, "a")
    assert t.state == "running"
    assert (t.turn_command is None) == (point != "turn_recorded")
    assert bool(t.memo.get("launch")) == (point != "turn_recorded")
    # whatever was launched waits at its gate: nothing runs that nobody knows of
    time.sleep(1.0)
    sbx = Sandbox.connect(t.sandbox_id)
    log = sbx.commands.run(["git", "log", "--format=%s"], cwd="/workspace").stdout
    assert "Add a" not in log
    orch = Orchestrator.resume(run_id)
    st = finish(orch, timeout=60)
    assert st["state"] == "finished", st
    a = task_state(st, "a")
    assert a["attempts"] == 1 and a["merged_commit"], a
    assert task_row(run_id, "a").failures == 0
    relaunch = [e.data for e in events(orch, "a") if e.kind == "relaunch"]
    if point == "turn_launching":  # never launched: sent again, as the same occurrence
        assert len(relaunch) == 1 and "adopted" not in relaunch[0]
        assert reactions(orch, "a") == [("start", 1), ("start", 1)]
    elif point == "turn_launched":  # launched but not recorded: adopted
        assert len(relaunch) == 1 and relaunch[0]["adopted"]
        assert reactions(orch, "a") == [("start", 1)]
    else:  # recorded: re-attached and let go
        assert relaunch == [] and reactions(orch, "a") == [("start", 1)]
    assert project.main_log() == ["Add a", "init"]
    assert live_sandboxes(run_id) == []


@pytest.mark.parametrize("point", ["before_push", "after_push"])
def test_a_push_cut_short_by_a_crash_lands_once(project: Project, point: str) -> None:
    one_task(project, [write_step("a.txt", "a\n"), {"commit": "Add a"}])
    run_id = crash_at(project, point)
    assert task_row(run_id, "a").state == "merging"
    on_main = project.main_log() == ["Add a", "init"]
    assert on_main == (point == "after_push")
    orch = Orchestrator.resume(run_id)
    st = finish(orch, timeout=60)
    assert st["state"] == "finished", st
    assert project.main_log() == ["Add a", "init"]  # pushed once, recorded once
    assert [e.task_id for e in events(orch) if e.kind == "merged"] == ["a"]
    from corral.store.orchestrator_models import OutboxRow

    with get_context().store.session() as s:
        rows = list(s.scalars(select(OutboxRow).where(OutboxRow.run_id == run_id)))
    assert [r.state for r in rows] == ["done"]
    assert live_sandboxes(run_id) == []
