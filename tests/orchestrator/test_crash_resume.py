"""kill -9 the orchestrator at random moments, resume, and check nothing is lost
or duplicated: every task merged once, no commit twice, no orphan sandbox."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from tests.orchestrator.conftest import git, live_sandboxes

from corral.compute.context import get_context
from corral.orchestrator.demo import find_examples, make_sample
from corral.store.orchestrator_models import RunRow, TaskEventRow

CORRAL = str(Path(sys.executable).parent / "corral")


def _run_id(repo: Path) -> str | None:
    with get_context().store.session() as s:
        row = s.scalars(select(RunRow).where(RunRow.repo == str(repo.resolve()))).first()
    return row.id if row else None


def crash_and_resume(tmp_path: Path, seed: int, kills: int) -> None:
    rng = random.Random(seed)
    repo, plan = make_sample(find_examples(), tmp_path / "demo")
    origin = tmp_path / "demo" / "origin.git"
    args = [CORRAL, "run", str(plan), "--repo", str(repo), "--origin", str(origin), "--json"]
    run_id = None
    for _ in range(kills):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 3.0))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        run_id = run_id or _run_id(repo)
        if run_id is not None:
            args = [CORRAL, "run", "--resume", run_id, "--json"]
    # a hang dumps every thread's stack (faulthandler on SIGABRT) before it fails
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGABRT)
        out, err = proc.communicate()
        raise AssertionError(f"the resumed run hung:\n{err[-12000:]}\n{_history(run_id)}"
                             ) from None
    assert proc.returncode == 0, f"{err[-4000:]}\n{_history(run_id)}"
    status = json.loads(out)
    assert status["state"] == "finished", _history(run_id)
    assert all(t["state"] == "merged" and t["merged_commit"] for t in status["tasks"])
    subjects = git(origin, "log", "--format=%s", "main").splitlines()
    assert len(subjects) == len(set(subjects)), \
        f"a commit landed twice: {subjects}\n{_history(run_id)}"
    expected = {"Add textkit.slug.slugify", "Add textkit.count.word_count",
                "word_count: split on any whitespace", "Add textkit.truncate",
                "Add textkit.wrap", "Add the textkit command line", "Document the helpers",
                "Release textkit 0.2.0", "Initial commit of textkit"}
    assert set(subjects) == expected
    trailers = git(origin, "log", "--format=%(trailers:key=Corral-Task,valueonly)", "main")
    tasks = [x for x in trailers.split() if x]
    # each task's rewritten commits carry its trailer; no task appears on two separate runs
    assert {t["id"] for t in status["tasks"]} >= set(tasks)
    assert live_sandboxes(status["run"]) == []


def _history(run_id: str | None) -> str:
    """The run's events, one line each: what a failure report needs."""
    if run_id is None:
        return "(no run recorded)"
    with get_context().store.session() as s:
        rows = list(s.scalars(select(TaskEventRow).where(TaskEventRow.run_id == run_id)
                              .order_by(TaskEventRow.id)))
    t0 = rows[0].at if rows else 0.0
    return "\n".join(f"{r.at - t0:8.3f} {r.task_id or '-':10} {r.kind:12} "
                     f"{r.from_state or ''}->{r.to_state or ''} {json.dumps(r.data)[:160]}"
                     for r in rows)


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_9_then_resume(tmp_path: Path, seed: int) -> None:
    crash_and_resume(tmp_path, seed, kills=1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10, 22))
def test_kill_9_many_times(tmp_path: Path, seed: int) -> None:
    crash_and_resume(tmp_path, seed, kills=3)
