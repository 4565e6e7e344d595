"""CI: the repository's own command, run on a commit in a fresh fork of the prebuild.

Never in the agent's sandbox: the agent cannot leave anything behind that
makes its own CI pass. The result carries what a ``ci_failed`` reaction needs:
the failing step, the last lines of the log, the failing tests, and a
signature that is the same when the same failure repeats.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.errors import CorralError
from corral.orchestrator.gitops import Repo
from corral.orchestrator.sandboxes import WORKDIR, SandboxFactory, send_commit

TAIL_LINES = 40
_UNITTEST_FAIL = re.compile(r"^(?:FAIL|ERROR): (\S+) \(([\w.]+)\)", re.MULTILINE)
_PYTEST_FAIL = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)
_NOISE = re.compile(r"0x[0-9a-f]+|\d+(?:\.\d+)?s\b|line \d+|\d{4}-\d\d-\d\d[T ][\d:.]+")


@dataclass
class CIResult:
    passed: bool
    exit_code: int
    seconds: float
    step: str
    log: str
    failing_tests: list[str] = field(default_factory=list)
    timed_out: bool = False
    #: the CI run's row in the store, once recorded
    row_id: int | None = None

    @property
    def tail(self) -> str:
        return "\n".join(self.log.rstrip().splitlines()[-TAIL_LINES:])

    @property
    def signature(self) -> str:
        """Same failure, same signature: the failing tests, or the log's normalized tail."""
        if self.passed:
            return "pass"
        basis = "\n".join(sorted(self.failing_tests)) or _NOISE.sub("#", self.tail)
        return hashlib.sha256(f"{self.exit_code}\n{basis}".encode()).hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        return {"step": self.step, "exit_code": self.exit_code, "timed_out": self.timed_out,
                "failing_tests": self.failing_tests, "tail": self.tail}


def failing_tests(log: str) -> list[str]:
    out = [f"{cls}.{name}" for name, cls in _UNITTEST_FAIL.findall(log)]
    out += _PYTEST_FAIL.findall(log)
    return list(dict.fromkeys(out))[:50]


def run_ci(factory: SandboxFactory, repo: Repo, commit: str, command: str | None,
           timeout: float, task_id: str, hints: list[str], log_path: Path | None = None
           ) -> CIResult:
    """Run ``command`` on ``commit`` in a fresh sandbox; a missing command passes."""
    t0 = time.monotonic()
    if not command:
        return CIResult(True, 0, 0.0, "(no ci.command)", "no CI command configured\n")
    sbx = factory.create("ci", task_id)
    try:
        try:
            send_commit(repo, sbx, commit, "refs/corral/ci", hints,
                        then=f"git checkout -q -f --detach {commit} && git clean -qfdx "
                             "-e .venv -e node_modules", what="checking out the commit for CI")
        except CorralError as exc:
            return CIResult(False, 125, time.monotonic() - t0, "(checkout)", str(exc))
        r = sbx.commands.run(command, cwd=WORKDIR, timeout=timeout)
    finally:
        factory.destroy(sbx)
    log = r.stdout + ("\n" if r.stdout and not r.stdout.endswith("\n") else "") + r.stderr
    if r.timed_out:
        log += f"\n(corral: CI timed out after {timeout:.0f}s)\n"
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(log)
    return CIResult(r.exit_code == 0, r.exit_code, time.monotonic() - t0, command, log,
                    failing_tests(log) if r.exit_code else [], r.timed_out)
