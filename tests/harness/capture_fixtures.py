"""Capture the fixtures of tests/harness/fixtures from the real CLIs.

    .venv/bin/python tests/harness/capture_fixtures.py [claude-code codex aider]

Runs each adapter in a real sandbox against the fake model server (offline),
through the same scenarios the tests use, and writes what the CLI printed.
Re-run it when a pin in corral/harness/pins.py changes, then check the parser
tests still pass.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from agent_runner import destroy_home, run_turn  # noqa: E402
from agent_scenarios import (  # noqa: E402
    BUDGET_SCRIPT,
    CI_PROMPT,
    FIX_PROMPT,
    FIX_SCRIPT,
    KEY_VARS,
    make_repo,
    options,
)

from corral.compute.sandbox import Sandbox  # noqa: E402
from corral.harness import AgentContext, Prompt, get_harness  # noqa: E402
from corral.testing.fakellm import FakeLLM  # noqa: E402


def capture(name: str, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="corral-capture-") as tmp:
        repo = make_repo(Path(tmp) / "repo")
        for scenario, script in (("fix", FIX_SCRIPT), ("budget", BUDGET_SCRIPT)):
            sbx = Sandbox.create(workspace=repo, metadata={"capture": name})
            try:
                with FakeLLM(script, netns=sbx.netns_path) as llm:
                    h = get_harness(name, options(name, llm.url))
                    env = {KEY_VARS[name]: "sk-fixture"}
                    ctx = AgentContext(task_id="T1", env=env, turn=1)
                    h.setup(sbx, ctx)
                    r = run_turn(h, sbx, ctx, Prompt(FIX_PROMPT))
                    _save(out, name, scenario, r.stdout, r.stderr)
                    print(f"{name} {scenario}: exit {r.exit_code}, {r.seconds:.1f}s, "
                          f"{len(llm.model_requests())} model calls")
                    if scenario == "fix":
                        ctx2 = AgentContext(task_id="T1", env=env, turn=2)
                        r2 = run_turn(h, sbx, ctx2, Prompt(CI_PROMPT, "ci_failed"),
                                      session=r.session_id)
                        _save(out, name, "followup", r2.stdout, r2.stderr)
                        print(f"{name} followup: exit {r2.exit_code}, {r2.seconds:.1f}s")
            finally:
                sbx.destroy()


def _save(out: Path, name: str, scenario: str, stdout: bytes, stderr: bytes) -> None:
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{scenario}.stdout").write_bytes(stdout)
    (d / f"{scenario}.stderr").write_bytes(stderr)


def main() -> None:
    names = sys.argv[1:] or ["claude-code", "codex", "aider"]
    home = tempfile.mkdtemp(prefix="corral-capture-home-")
    os.environ["CORRAL_HOME"] = home
    try:
        for name in names:
            capture(name, HERE / "fixtures")
    finally:
        destroy_home(home)


if __name__ == "__main__":
    main()
