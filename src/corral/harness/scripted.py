"""``scripted``: the offline, deterministic harness that drives the demo and tests.

The agent is ``scripted_agent.py``, copied into the sandbox and run with the
sandbox's ``python3``; it follows a script of steps per reaction (see
docs/scripted.md). A task gives its script in the plan as ``script:`` (a
mapping, or a path to a YAML/JSON file relative to the plan).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.errors import ConfigError
from corral.harness.base import STATE_DIR, AgentContext, Harness, Launch, Prompt
from corral.harness.events import Event, output

if TYPE_CHECKING:
    from corral.compute.sandbox import Sandbox

AGENT_PROGRAM = Path(__file__).with_name("scripted_agent.py")
PROGRAM = f"{STATE_DIR}/scripted_agent.py"
SCRIPT = f"{STATE_DIR}/script.json"

#: reactions a script may name (with an optional ``@N`` occurrence suffix)
REACTIONS = ("start", "ci_failed", "changes_requested", "conflict", "stuck", "retry")
STEPS = ("say", "write", "append", "delete", "patch", "run", "sleep", "work", "commit",
         "usage", "tool", "hang", "exit")


def check_script(script: Any, where: str) -> dict[str, Any]:
    """Validate a script mapping; raises ``ConfigError`` naming the bad reaction or step."""
    if not isinstance(script, Mapping):
        raise ConfigError(f"{where}: a script is a mapping of reaction -> steps")
    for key, steps in script.items():
        name, _, occ = str(key).partition("@")
        if name not in REACTIONS or (occ and not occ.isdigit()):
            raise ConfigError(f"{where}: unknown reaction {key!r} "
                              f"(one of {', '.join(REACTIONS)}, optionally @N)")
        if not isinstance(steps, list):
            raise ConfigError(f"{where}: {key}: a list of steps")
        for i, step in enumerate(steps):
            if not isinstance(step, Mapping) or len(step) != 1:
                raise ConfigError(f"{where}: {key}[{i}]: a step is a mapping with one key")
            op = next(iter(step))
            if op not in STEPS:
                raise ConfigError(f"{where}: {key}[{i}]: unknown step {op!r} "
                                  f"(one of {', '.join(STEPS)})")
    return dict(script)


class Scripted(Harness):
    """Runs the task's script inside the sandbox; events are its JSON lines."""

    name = "scripted"
    #: its script's ``usage`` steps are the agent's whole spending
    reports_usage = True

    def setup(self, sbx: Sandbox, ctx: AgentContext) -> None:
        script = ctx.options.get("script")
        if script is None:
            raise ConfigError(f"task {ctx.task_id}: the scripted harness needs a `script:`")
        sbx.files.write(PROGRAM, AGENT_PROGRAM.read_bytes())
        sbx.files.write(SCRIPT, json.dumps({"reactions": script, "session": ctx.task_id}))

    def launch(self, ctx: AgentContext, prompt: Prompt, session: str | None) -> Launch:
        pfile = f"{STATE_DIR}/prompt-{ctx.turn}.txt"
        return Launch(
            command=["python3", PROGRAM, SCRIPT, prompt.reaction, str(prompt.occurrence), pfile],
            files={pfile: prompt.text},
            env={"CORRAL_WORKDIR": ctx.workdir, "PYTHONDONTWRITEBYTECODE": "1"},
        )

    def parse(self, line: str, stream: str) -> list[Event]:
        if stream == "stdout" and line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                return [output(line, stream)]
            if isinstance(obj, dict):
                return [Event.from_json(obj)]
        return [output(line, stream)]
