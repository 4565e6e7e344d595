"""Tiny real repositories with a bare origin, and a helper to run a plan on them."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from corral.orchestrator.engine import Orchestrator
from corral.orchestrator.plan import load_plan

GIT_ENV = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}

CI = "python3 -m unittest discover -s tests -t . -q"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True,
                          text=True, check=True).stdout


def publish(seed: Path) -> tuple[Path, Path]:
    """Commit ``seed`` as main, make a bare origin of it and a clone beside it:
    (origin, clone)."""
    git(seed, "init", "-q", "-b", "main")
    git(seed, "add", "-A")
    git(seed, "commit", "-q", "-m", "init")
    root = seed.parent
    origin, repo = root / "origin.git", root / "repo"
    git(root, "clone", "-q", "--bare", str(seed), str(origin))
    git(root, "clone", "-q", str(origin), str(repo))
    return origin, repo


class Project:
    """A repo (a clone) with a bare origin, and a plan file beside it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        seed = root / "seed"
        (seed / "tests").mkdir(parents=True)
        (seed / "tests" / "__init__.py").write_text("")
        (seed / "tests" / "test_ok.py").write_text(
            "import unittest\n\n\nclass T(unittest.TestCase):\n"
            "    def test_ok(self):\n        self.assertTrue(True)\n")
        (seed / "corral.yaml").write_text(yaml.safe_dump({"ci": {"command": CI}}))
        (seed / "app.txt").write_text("one\ntwo\nthree\n")
        self.origin, self.repo = publish(seed)
        self.plan_file = root / "plan.yaml"

    def write_plan(self, tasks: list[dict[str, Any]], **sections: Any) -> Path:
        data = {"agents": {"harness": "scripted", "max_parallel": 4, "retry_backoff": "0.05s"},
                **sections, "tasks": tasks}
        self.plan_file.write_text(yaml.safe_dump(data, sort_keys=False))
        return self.plan_file

    def orchestrator(self, **kw: Any) -> Orchestrator:
        plan = load_plan(self.repo, self.plan_file)
        return Orchestrator.create(plan, self.repo, origin=str(self.origin),
                                   plan_path=self.plan_file, **kw)

    def main_log(self) -> list[str]:
        return git(self.origin, "log", "--format=%s", "main").splitlines()

    def show(self, path: str) -> str:
        return git(self.origin, "show", f"main:{path}")


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


def run_in_thread(orch: Orchestrator, timeout: float = 90
                  ) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["status"] = orch.run()
        except BaseException as exc:
            out["error"] = exc

    th = threading.Thread(target=target, daemon=True)
    th.start()
    return th, out


def finish(orch: Orchestrator, timeout: float = 90) -> dict[str, Any]:
    th, out = run_in_thread(orch)
    th.join(timeout)
    if th.is_alive():
        orch.stop()
        th.join(30)
        raise AssertionError(f"run did not finish in {timeout}s: {orch.status()}")
    if "error" in out:
        raise out["error"]
    return dict(out["status"])


def wait_for(pred: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def task_state(status: dict[str, Any], task: str) -> dict[str, Any]:
    return next(t for t in status["tasks"] if t["id"] == task)


def events(orch: Orchestrator, task: str | None = None) -> list[Any]:
    from sqlalchemy import select

    from corral.store.orchestrator_models import TaskEventRow

    with orch.ctx.store.session() as s:
        q = select(TaskEventRow).where(TaskEventRow.run_id == orch.run_id)
        if task:
            q = q.where(TaskEventRow.task_id == task)
        return list(s.scalars(q.order_by(TaskEventRow.id)))


def write_step(path: str, content: str) -> dict[str, Any]:
    return {"write": {"path": path, "content": content}}


def live_sandboxes(run_id: str) -> list[str]:
    from corral.compute import Sandbox

    return [s.id for s in Sandbox.list(metadata={"corral.run": run_id})]
