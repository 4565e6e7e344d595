"""The real CLIs (pinned, installed through corral's installer and cached) run by
their adapters in real sandboxes, against the fake model server listening in the
sandbox's own network namespace: fully offline."""

from __future__ import annotations

import pytest
from agent_runner import run_turn
from agent_scenarios import (
    BUDGET_SCRIPT,
    CI_PROMPT,
    FIX_PROMPT,
    FIX_SCRIPT,
    KEY_VARS,
    make_repo,
    options,
)

from corral.compute.sandbox import Sandbox
from corral.harness import AgentContext, Prompt, get_harness
from corral.harness.events import EventKind as K
from corral.harness.install import install
from corral.testing.fakellm import FakeLLM

pytestmark = pytest.mark.root
HARNESSES = ["claude-code", "codex", "aider"]
KEY = "sk-corral-test-key"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("repo") / "repo")


@pytest.fixture
def sandbox(repo):
    sbx = Sandbox.create(workspace=repo, metadata={"test": "harness"})
    try:
        yield sbx
    finally:
        sbx.destroy()


def _harness(name: str, url: str):
    install(name)  # cached after the first run on a machine
    return get_harness(name, options(name, url))


def _ctx(name: str, turn: int = 1) -> AgentContext:
    return AgentContext(task_id="T1", env={KEY_VARS[name]: KEY}, turn=turn)


@pytest.mark.parametrize("name", HARNESSES)
def test_cli_edits_runs_and_follows_up(name, sandbox):
    with FakeLLM(FIX_SCRIPT, netns=sandbox.netns_path, api_key=KEY) as llm:
        h = _harness(name, llm.url)
        h.setup(sandbox, _ctx(name))
        r = run_turn(h, sandbox, _ctx(name), Prompt(FIX_PROMPT))
        assert r.exit_code == 0, r.stdout[-2000:]
        # the CLI really edited the workspace and ran the check
        assert sandbox.files.read_text("/workspace/calc.py").endswith("return a + b\n")
        assert sandbox.files.read_text("/workspace/NOTES.md") == "calc.add now adds.\n"
        edited = {e.data["path"].rsplit("/", 1)[-1] for e in r.kinds(K.FILE_EDIT)}
        assert {"calc.py", "NOTES.md"} <= edited
        (cmd,) = r.kinds(K.COMMAND)
        assert "check_calc.py" in cmd.data["command"] and cmd.data["exit_code"] == 0
        # every model call carried the key the sandbox was given
        calls = llm.model_requests()
        assert calls and {c.api_key for c in calls} == {KEY}
        # the events report exactly the tokens the model API reported
        assert r.tokens() == llm.tokens()
        assert r.session_id
        first_calls = len(calls)

        # a reaction: the follow-up goes to the same session (or restored chat)
        r2 = run_turn(h, sandbox, _ctx(name, 2), Prompt(CI_PROMPT, "ci_failed"),
                      session=r.session_id)
        assert r2.exit_code == 0, r2.stdout[-2000:]
        assert sandbox.files.read_text("/workspace/CHANGELOG.md") == "- fix calc.add\n"
        later = llm.model_requests()[first_calls:]
        assert later and all(c.rule == 1 for c in later)
        # the model saw the earlier conversation: the first prompt is in the history
        assert all(FIX_PROMPT.split(":")[0] in c.body.decode() for c in later)
        assert r2.session_id == r.session_id
        # a resumed session's events count only this turn's calls
        assert r2.tokens() == (sum(c.usage[0] for c in later), sum(c.usage[1] for c in later))


@pytest.mark.parametrize("name", [
    "claude-code", "codex",
    pytest.param("aider", marks=pytest.mark.slow),  # litellm retries a 429 for ~70 s
])
def test_budget_refusal_stops_the_cli(name, sandbox):
    """The proxy's refusal (a 429 in the provider's shape, x-should-retry: false)."""
    with FakeLLM(BUDGET_SCRIPT, netns=sandbox.netns_path) as llm:
        h = _harness(name, llm.url)
        h.setup(sandbox, _ctx(name))
        r = run_turn(h, sandbox, _ctx(name), Prompt(FIX_PROMPT), timeout=200)
        assert r.kinds(K.ERROR)
        assert r.tokens() == (0, 0)
        assert sandbox.files.read_text("/workspace/calc.py").endswith("return a - b\n")
        if name != "aider":  # Aider exits 0 whatever happened
            assert r.exit_code != 0
            assert len(llm.model_requests()) == 1, "the CLI retried a refusal"
            assert r.seconds < 30


def test_setup_says_when_the_sandbox_cannot_see_the_cli(sandbox):
    from corral.errors import MissingTool

    h = get_harness("codex", {"install": "layer"})  # nothing installed in this env
    with pytest.raises(MissingTool, match="not visible inside the sandbox"):
        h.setup(sandbox, _ctx("codex"))
