"""Shared material of the harness tests: a tiny repository with a bug, model
scripts that fix it, and the adapter options that point each real CLI at a
fake model server."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

CALC = "def add(a, b):\n    return a - b\n"
CHECK = ("import calc\n\nassert calc.add(2, 3) == 5, 'add is wrong'\n"
         "print('calc ok')\n")

#: one turn that edits, writes and runs; then a closing message. A reaction
#: (CI failed) gets its own rule. Harness-neutral: the fake server turns the
#: actions into each CLI's own tools (or edit blocks for Aider).
FIX_SCRIPT: dict[str, Any] = {"rules": [
    {"match": {"contains": "Fix calc.add"}, "turns": [
        {"text": "I'll fix calc.add and check it.",
         "edit": {"path": "calc.py", "old": "    return a - b\n", "new": "    return a + b\n"},
         "write": {"path": "NOTES.md", "content": "calc.add now adds.\n"},
         "run": "python3 check_calc.py"},
        {"text": "Fixed calc.add; check_calc.py passes."}]},
    {"match": {"contains": "CI failed"}, "turns": [
        {"text": "Adding the changelog entry CI asks for.",
         "write": {"path": "CHANGELOG.md", "content": "- fix calc.add\n"}},
        {"text": "Added CHANGELOG.md."}]},
]}

FIX_PROMPT = "Fix calc.add: it subtracts. Then run python3 check_calc.py."
CI_PROMPT = "CI failed: the changelog check says CHANGELOG.md is missing. Add it."

#: what the proxy answers when a budget is spent (security/metering.refusal_response)
REFUSAL = "corral: this sandbox has used 100 model tokens, its limit is 50"
BUDGET_SCRIPT: dict[str, Any] = {"rules": [
    {"match": {"contains": "Fix calc.add", "api": "anthropic"}, "turns": [
        {"status": 429, "headers": {"x-should-retry": "false"},
         "error_body": {"type": "error",
                        "error": {"type": "rate_limit_error", "message": REFUSAL}}}]},
    {"match": {"contains": "Fix calc.add"}, "turns": [
        {"status": 429, "headers": {"x-should-retry": "false"},
         "error_body": {"error": {"message": REFUSAL, "type": "insufficient_quota",
                                  "param": None, "code": "corral_limit"}}}]}]}

MODELS = {"claude-code": "claude-sonnet-4-5", "codex": "gpt-5.5", "aider": "openai/fake-model"}
KEY_VARS = {"claude-code": "ANTHROPIC_API_KEY", "codex": "OPENAI_API_KEY",
            "aider": "OPENAI_API_KEY"}


def options(harness: str, base_url: str) -> dict[str, Any]:
    """Adapter options for a run against the fake server at ``base_url``."""
    opts: dict[str, Any] = {"base_url": base_url, "model": MODELS[harness]}
    if harness == "aider":
        opts.update(edit_format="diff", test_command="python3 check_calc.py",
                    model_metadata={"max_input_tokens": 128000, "max_output_tokens": 8000,
                                    "input_cost_per_token": 0.000001,
                                    "output_cost_per_token": 0.000002,
                                    "litellm_provider": "openai", "mode": "chat"})
    return opts


def make_repo(path: Path) -> Path:
    """A git repository with the bug, committed on main."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "calc.py").write_text(CALC)
    (path / "check_calc.py").write_text(CHECK)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin", "HOME": str(path)}
    for argv in (["git", "init", "-q", "-b", "main"], ["git", "add", "."],
                 ["git", "commit", "-q", "-m", "calc"]):
        subprocess.run(argv, cwd=path, env=env, check=True, capture_output=True)
    return path
