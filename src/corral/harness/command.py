"""``command``: run any agent CLI in the sandbox.

Configured in corral.yaml::

    agents:
      harness: command
      command: "my-agent --yes"          # run in /workspace
      prompt_via: argument               # argument | file | stdin
      follow_up_command: "my-agent --continue"   # optional; default: command

With ``argument`` the prompt is appended as the last argument (shell-quoted) or
replaces ``{prompt}``; with ``file`` its path replaces ``{prompt_file}`` (or is
appended); with ``stdin`` it is fed on standard input. A line the CLI prints
that is a JSON object with a ``kind`` (``{"kind": "usage", "output_tokens":
10}``) is read as an event; every other line is a message.
"""

from __future__ import annotations

import json
import shlex

from corral.errors import ConfigError
from corral.harness.base import STATE_DIR, AgentContext, Harness, Launch, Prompt
from corral.harness.events import Event, message, output

PROMPT_VIA = ("argument", "file", "stdin")


class Command(Harness):
    """Any CLI: the prompt goes in as an argument, a file or standard input."""

    name = "command"

    def launch(self, ctx: AgentContext, prompt: Prompt, session: str | None) -> Launch:
        opts = {**self.options, **ctx.options}
        template = str(opts.get("command") or "")
        if not template.strip():
            raise ConfigError("agents.command: the command harness needs a command to run")
        if prompt.reaction != "start" and opts.get("follow_up_command"):
            template = str(opts["follow_up_command"])
        via = str(opts.get("prompt_via") or "argument")
        if via not in PROMPT_VIA:
            raise ConfigError(f"agents.prompt_via: one of {', '.join(PROMPT_VIA)}, not {via!r}")
        pfile = f"{STATE_DIR}/prompt-{ctx.turn}.txt"
        cmd = template.replace("{session}", shlex.quote(session or ""))
        if via == "argument":
            quoted = shlex.quote(prompt.text)
            cmd = cmd.replace("{prompt}", quoted) if "{prompt}" in cmd else f"{cmd} {quoted}"
        elif via == "file":
            cmd = (cmd.replace("{prompt_file}", pfile) if "{prompt_file}" in cmd
                   else f"{cmd} {pfile}")
        else:
            cmd = f"{cmd} < {pfile}"
        env = {"CORRAL_PROMPT_FILE": pfile, "CORRAL_REACTION": prompt.reaction,
               "CORRAL_TASK": ctx.task_id}
        return Launch(command=cmd, files={pfile: prompt.text}, env=env)

    def parse(self, line: str, stream: str) -> list[Event]:
        if stream != "stdout":
            return [output(line, stream)]
        if line.startswith("{") and '"kind"' in line:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict) and "kind" in obj:
                return [Event.from_json(obj)]
        return [message(line)]
