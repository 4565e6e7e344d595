"""``corral demo``: the main job, end to end and offline.

Builds the sample repository from ``examples/demo/repo`` in a temporary
directory with a bare origin, runs ``examples/demo/plan.yaml`` through the
scripted harness, and reports what happened.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from corral.compute.context import get_context
from corral.errors import UsageError
from corral.orchestrator.engine import Orchestrator
from corral.orchestrator.plan import load_plan


def find_examples(explicit: Path | None = None) -> Path:
    """The demo's directory: ``explicit``, the source tree's examples/, or ./examples."""
    candidates = [explicit] if explicit else [
        Path(__file__).resolve().parents[3] / "examples" / "demo",
        Path.cwd() / "examples" / "demo",
    ]
    for c in candidates:
        if c is not None and (c / "plan.yaml").is_file() and (c / "repo").is_dir():
            return c
    raise UsageError("cannot find examples/demo (with plan.yaml and repo/); pass --examples")


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
           "GIT_AUTHOR_NAME": "corral demo", "GIT_AUTHOR_EMAIL": "demo@corral.invalid",
           "GIT_COMMITTER_NAME": "corral demo", "GIT_COMMITTER_EMAIL": "demo@corral.invalid"}
    r = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       check=True)
    return r.stdout


def make_sample(examples: Path, where: Path) -> tuple[Path, Path]:
    """The sample repo (a clone whose origin is a fresh bare repo) and the plan file."""
    where.mkdir(parents=True, exist_ok=True)
    seed = where / "seed"
    shutil.copytree(examples / "repo", seed)
    _git(seed, "init", "-q", "-b", "main")
    _git(seed, "add", "-A")
    _git(seed, "commit", "-q", "-m", "Initial commit of textkit")
    origin = where / "origin.git"
    _git(where, "clone", "-q", "--bare", str(seed), str(origin))
    shutil.rmtree(seed)
    repo = where / "textkit"
    _git(where, "clone", "-q", str(origin), str(repo))
    plan = where / "plan.yaml"
    shutil.copy(examples / "plan.yaml", plan)
    shutil.copytree(examples / "scripts", where / "scripts")
    return repo, plan


def run_demo(examples: Path | None = None, *, keep: bool = True,
             on_orchestrator: Any = None, harness: str | None = None) -> dict[str, Any]:
    """Run the demo; returns the summary (and the run's status). ``harness`` runs the
    plan with a real agent CLI against a fake model behind the proxy instead."""
    ex = find_examples(examples)
    t0 = time.monotonic()
    # under CORRAL_HOME, not /tmp: the origin is kept to look at, and goes with the home
    demos = get_context().home / "demos"
    demos.mkdir(parents=True, exist_ok=True)
    where = Path(tempfile.mkdtemp(prefix="demo-", dir=demos))
    dry = None
    try:
        repo, plan_file = make_sample(ex, where)
        if harness:  # the fake provider, the plan's agents and the policy (testing.fakellm)
            from corral.testing.fakellm.dryrun import prepare_plan

            dry = prepare_plan(harness, repo, plan_file, where / "dry-run").__enter__()
        plan = load_plan(repo, plan_file)
        orch = Orchestrator.create(plan, repo, origin=str(where / "origin.git"),
                                   plan_path=plan_file)
        if on_orchestrator is not None:
            on_orchestrator(orch)
        status = orch.run()
        wall = time.monotonic() - t0
        log = _git(where / "origin.git", "log", "--format=%h %s", "main").splitlines()
        tasks = status["tasks"]
        summary = {
            "run": status["run"], "state": status["state"],
            "tasks": len(tasks),
            "merged": sum(1 for t in tasks if t["state"] == "merged"),
            "ci_runs": sum(t["ci_runs"] for t in tasks),
            "ci_failures": sum(t["ci_failures"] for t in tasks),
            "conflicts": sum(t["conflicts"] for t in tasks),
            "tokens": status["tokens"],
            "wall_seconds": round(wall, 2),
            "origin": str(where / "origin.git") if keep else None,
            "main_log": log,
            "status": status,
        }
        if dry is not None:
            from corral.testing.fakellm.dryrun import metered_by_task

            summary["harness"] = harness
            summary["metered"] = metered_by_task(status["run"], home=orch.home)
        return summary
    finally:
        if dry is not None:
            dry.__exit__(None, None, None)
        shutil.rmtree(where / "textkit", ignore_errors=True)
        shutil.rmtree(where / "scripts", ignore_errors=True)
        if not keep:
            shutil.rmtree(where, ignore_errors=True)
