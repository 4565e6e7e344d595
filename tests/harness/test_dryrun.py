"""Dry runs: the demo plan's scripted steps become a model script, and
``corral demo --harness X`` runs the plan with the real CLI against the fake
model behind the real proxy, printing the tokens the proxy metered per task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from corral.testing.fakellm import Append, Write
from corral.testing.fakellm.plans import CLOSING_USAGE, script_for_tasks

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"


def _scripts() -> dict:
    plan = yaml.safe_load((DEMO / "plan.yaml").read_text())
    return {t["id"]: yaml.safe_load((DEMO / t["script"]).read_text()) for t in plan["tasks"]}


def test_scripted_steps_become_model_turns_in_order():
    script = script_for_tasks(_scripts(), split=False)  # Aider: one answer per prompt
    prompts = [
        ("You are working on task wrap: Add textkit.wrap and export it\n...", "wrap"),
        ("<system-reminder>x</system-reminder>\nCI failed on your change for task "
         "wordcount (Add textkit.count.word_count).\nThis is CI round 1 of at most 3.", None),
        ("Your change for task wrap (Add textkit.wrap and export it) no longer applies "
         "to main: ... (conflict 1 of at most 2).", None),
    ]
    start = script.choose([(prompts[0][0], 0)], "anthropic", "m").value
    actions = start.actions()
    assert [type(a).__name__ for a in actions] == ["Write", "Write", "Append", "str"]
    assert isinstance(actions[2], Append) and actions[2].path == "textkit/__init__.py"
    assert actions[3].startswith("git add -A && git commit -q -m 'Add textkit.wrap'")
    assert (start.usage.input_tokens, start.usage.output_tokens) == (900, 200)
    assert start.delay == 0.3
    ci = script.choose([(prompts[0][0], 1), (prompts[1][0], 0)], "anthropic", "m")
    assert ci.value.text == "the whitespace test fails; split on any whitespace instead"
    conflict = script.choose([(prompts[2][0], 0)], "anthropic", "m").value.actions()
    # order kept: the reset comes before the rewrite
    assert conflict[0] == "git reset -q --hard origin/main" and isinstance(conflict[1], Write)
    # after the action turn, a short closing answer with fixed usage
    closing = script.choose([(prompts[2][0], 1)], "anthropic", "m").value
    assert closing.usage.input_tokens == CLOSING_USAGE["input_tokens"] and not closing.actions()
    # unrelated prompts get the fallback
    assert script.choose([("hello", 0)], "chat", "m").rule is None
    # for tool-using clients, one action per turn: order holds even if a client runs
    # the calls of one answer in parallel (Codex)
    split = script_for_tasks(_scripts())
    turns = [split.choose([(prompts[2][0], n)], "responses", "m").value for n in range(6)]
    assert [len(t.actions()) for t in turns] == [1, 1, 1, 1, 1, 0]
    assert turns[0].actions()[0] == "git reset -q --hard origin/main"
    assert turns[0].usage.input_tokens == 700 and turns[0].text


def _demo(harness: str, home: Path) -> dict:
    env = {**os.environ, "CORRAL_HOME": str(home)}
    try:
        r = subprocess.run([sys.executable, "-m", "corral.cli.main", "demo", "--harness",
                            harness, "--json"], env=env, capture_output=True, text=True,
                           timeout=300)
    finally:
        from agent_runner import destroy_home

        destroy_home(home)
    assert r.stdout.strip(), r.stderr[-3000:]
    return json.loads(r.stdout)


@pytest.mark.root
@pytest.mark.parametrize("harness", [
    "codex",  # the others cover the same path; with them it takes ~1 min more
    pytest.param("claude-code", marks=pytest.mark.slow),
    pytest.param("aider", marks=pytest.mark.slow),
])
def test_demo_with_a_real_cli(harness, tmp_path):
    from corral.harness.install import install

    install(harness)
    s = _demo(harness, tmp_path / "home")
    assert s["harness"] == harness
    states = {t["id"]: t["state"] for t in s["status"]["tasks"]}
    assert set(states.values()) == {"merged"}, states
    assert s["ci_failures"] >= 1  # wordcount's first try fails CI, its reaction fixes it
    # per task: what the proxy metered is what the agent's events reported
    for t in s["status"]["tasks"]:
        m = s["metered"][t["id"]]
        assert m["input_tokens"] + m["output_tokens"] == t["tokens"], t["id"]
    assert s["main_log"][0].endswith("Release textkit 0.2.0")


def test_a_plain_sed_becomes_an_edit_other_commands_stay_commands():
    from corral.testing.fakellm import Edit

    script = script_for_tasks({"rel": {"start": [
        {"run": "sed -i 's/__version__ = \"0.1.0\"/__version__ = \"0.2.0\"/' pkg/__init__.py"},
        {"run": "sed -i 's/^x.*$/y/' a.txt"},
        {"delete": "old.txt"}]}})
    actions = [a for t in script.rules[0].turns for a in t.actions()]
    assert actions[0] == Edit(path="pkg/__init__.py", old='__version__ = "0.1.0"',
                              new='__version__ = "0.2.0"')
    assert actions[1:] == ["sed -i 's/^x.*$/y/' a.txt", "rm -f old.txt"]
