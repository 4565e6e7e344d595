"""``claude-code``: Anthropic's Claude Code CLI, run non-interactively.

    claude -p --output-format stream-json --verbose --dangerously-skip-permissions \
        [--model M] [--resume SESSION] < prompt

The prompt goes in on standard input (no argument-length limit for long CI
logs). Follow-ups resume the session (``--resume``, the ``session_id`` of the
earlier turn's events); its transcript lives under ``~/.claude`` in the
sandbox, so a fresh sandbox starts a fresh session.

Environment: ``ANTHROPIC_BASE_URL`` (``base_url``), ``ANTHROPIC_API_KEY``
(the sentinel in a fenced sandbox), and ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC``
so the only connections are model calls (measured: ``HEAD /`` then ``POST
/v1/messages?beta=true``). ``IS_SANDBOX=1`` lets it skip permission prompts
when a sandbox runs as root. Permission prompts are off
(``--dangerously-skip-permissions``) and its own Bash sandbox stays off (the
default): corral's sandbox and fence are the boundary (see ``_cli``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from corral.harness._cli import AgentCli
from corral.harness._parse_claude import ClaudeParser
from corral.harness.base import AgentContext, Launch, Prompt


class ClaudeCode(AgentCli):
    name = "claude-code"
    key_env: ClassVar[str] = "ANTHROPIC_API_KEY"

    def new_parser(self) -> Any:
        return ClaudeParser()

    def launch(self, ctx: AgentContext, prompt: Prompt, session: str | None) -> Launch:
        opts = self.opts(ctx)
        pfile = self.prompt_file(ctx)
        argv = [str(self.installed(ctx).binary), "-p", "--output-format", "stream-json",
                "--verbose", "--dangerously-skip-permissions"]
        if opts.get("model"):
            argv += ["--model", str(opts["model"])]
        if session:
            argv += ["--resume", session]
        argv += self.extra_args(opts)
        env = {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_AUTOUPDATER": "1",
               "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1", "IS_SANDBOX": "1",
               "PYTHONDONTWRITEBYTECODE": "1"}
        if opts.get("base_url"):
            env["ANTHROPIC_BASE_URL"] = str(opts["base_url"]).rstrip("/")
        command = self.shell(argv, stdin=pfile,
                             env_from={"ANTHROPIC_API_KEY": self.key_var(opts)})
        return Launch(command=command, files={pfile: prompt.text}, env=env)
